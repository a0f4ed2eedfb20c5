"""Shell completion of ush and usher (usher.completion): generated from the
parsers, the shipped scripts current, and bash really completing with them."""

import os
import shutil
import subprocess

import pytest

from usher import admin, completion
from usher.clients.ush import cli, program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shipped(name):
    with open(os.path.join(REPO, "etc", "completion", name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("prog", ["ush", "usher"])
@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_the_shipped_scripts_are_the_generators_output(prog, shell):
    parser = completion.ush_parser() if prog == "ush" else admin.build_parser()
    assert shipped(f"{prog}.{shell}") == completion.script(parser, shell), (
        f"etc/completion/{prog}.{shell} is stale: usher completion {shell} --program {prog} "
        f"> etc/completion/{prog}.{shell}")


def test_every_ush_command_and_its_options_are_offered():
    parser = completion.ush_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(cli.build_parsers()) <= set(commands)
    assert "--cluster" in commands["list"]._option_string_actions
    assert "--completion" in parser._option_string_actions


def test_ush_and_usher_print_their_scripts(capsys):
    assert program.run(["--completion", "bash"], settings_loader=lambda *_a, **_k: None) == 0
    assert "_shtab_ush_subparsers=(" in capsys.readouterr().out
    assert admin.main(["completion", "bash"]) == 0
    assert "_shtab_usher_subparsers=(" in capsys.readouterr().out
    assert admin.main(["completion", "fish"]) == 2


def _complete(script, words, cword):
    """What bash offers for ``words`` (COMP_WORDS) at word ``cword``."""
    line = " ".join(words)
    driver = (f"{script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)}); "
              f"COMP_CWORD={cword}; COMP_LINE={line!r}; COMP_POINT={len(line)}; "
              f"_shtab_{words[0]} {words[0]} '{words[cword]}' '{words[cword - 1]}'; "
              "printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completes_commands_and_options_with_the_shipped_script():
    script = shipped("ush.bash")
    assert {"list", "list_lnm"} <= set(_complete(script, ["ush", "li"], 1))
    assert "--cluster" in _complete(script, ["ush", "list", "--c"], 2)
    assert {"ipam", "user"} & set(_complete(shipped("usher.bash"), ["usher", "u"], 1)) == {"user"}

"""The fence agent hook: the site's command that powers a lost host off
(IPMI, a PDU ...) and says so by its exit status.

An argv (no shell) from the plugin's configuration, with the placeholders
``{lnm}`` and ``{hostname}``; exit 0 means the host is off (fenced), the
first line of its standard output is the evidence; anything else (another
status, no answer within the timeout, a command that cannot run) is a
failure, never a fence. ``run_fence_command`` blocks: the plugin runs it in
the controller's plugin thread pool (``api.run_blocking``).
"""

import os
import re
import signal
import string
import subprocess
from dataclasses import dataclass

from usher.errors import ConfigError

PLACEHOLDERS = ("lnm", "hostname")
# What an LNM's hostname may be before it is put in a command's argv (it
# comes from the LNM, which may be compromised): a DNS name, no option.
HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})\Z")
MAX_OUTPUT = 65536
MAX_EVIDENCE = 300


@dataclass
class FenceOutcome:
    fenced: bool
    evidence: str = ""
    error: str = ""


def check_command(argv, key):
    """A configured fence command -> it as a list (empty: none). Raises
    ConfigError naming ``key``."""
    if argv is None:
        return None
    if isinstance(argv, str):
        argv = [argv]
    argv = [a for a in argv]
    if argv and not argv[0].strip():
        raise ConfigError(f"{key}: the command is empty")
    for arg in argv:
        try:
            fields = [f for _text, f, _spec, _conv in string.Formatter().parse(arg)
                      if f is not None]
        except ValueError as e:
            raise ConfigError(f"{key}: {arg!r}: {e}") from None
        unknown = [f for f in fields if f not in PLACEHOLDERS]
        if unknown:
            raise ConfigError(f"{key}: unknown placeholder {{{unknown[0]}}} in {arg!r} "
                              "(known: {lnm}, {hostname})")
    return argv


def command_for(argv, lnm, hostname):
    """-> the argv to run for ``lnm``, or raise ValueError when its
    hostname cannot be used."""
    if any("{hostname}" in arg for arg in argv):
        if not isinstance(hostname, str) or not HOSTNAME.match(hostname):
            raise ValueError(f"LNM {lnm} has no usable hostname ({str(hostname)[:60]!r}); "
                             "set one in the plugin's [hosts] section")
    return [arg.format(lnm=lnm, hostname=hostname) for arg in argv]


def _first_line(data):
    text = data[:MAX_OUTPUT].decode("utf-8", errors="replace").strip()
    return text.splitlines()[0].strip()[:MAX_EVIDENCE] if text else ""


def run_fence_command(argv, timeout):
    """Run ``argv`` (blocking, in a thread) -> FenceOutcome. On timeout its
    whole process group is killed."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as e:
        return FenceOutcome(False, error=f"{argv[0]} could not run: {e.strerror or e}")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return FenceOutcome(False, error=f"{argv[0]} did not answer within {timeout:g} s "
                                         "(killed)")
    name = os.path.basename(argv[0])
    if proc.returncode == 0:
        return FenceOutcome(True, evidence=f"{name}: {_first_line(out) or 'exit status 0'}")
    why = _first_line(err) or _first_line(out)
    return FenceOutcome(False, error=f"{name} exit status {proc.returncode}"
                                     + (f": {why}" if why else ""))

"""The configuration rules of the Usher documentation, one by one.

Every test writes its own files under tmp_path and passes env and home
explicitly: nothing reads the real /etc/usher or ~.
"""

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from usher import errors, settings
from usher.config import (ComponentSpec, ConfigError, config_files, load_config,
                          load_plugin_config, parse_spec)

ETC = Path(__file__).resolve().parent.parent / "etc"

# A spec exercising every check, used for the rule-by-rule tests.
SPEC = """
[main]
text = string(default='fallback')
other = string(default=None)
number = integer(min=1, max=100, default=7)
ratio = float(gt=0, default=0.5)
flag = boolean(default=False)
names = list(default=list())
where = path(default=None)
level = option('low', 'high', default='low')
[[sub]]
text = string(default=None)
copy = string(default=None)
number = integer(default=None)
[[[deeper]]]
copy = string(default=None)
[[items]]
[[[__many__]]]
text = string(default=None)
copy = string(default=None)
required = string()
"""


def write(directory, name, text):
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


def load(tmp_path, text, spec=SPEC):
    """Load one file against a spec; the result without the implicit 'order'."""
    result = load_plugin_config(spec, write(tmp_path, "test.config", text), home="/home/alice")
    assert result.pop("order") is None
    return result


def error_of(tmp_path, text, spec=SPEC):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, spec)
    return str(caught.value)


def component(tmp_path, spec=SPEC, **changes):
    """A component whose host file lives under tmp_path."""
    fields = dict(name="main", spec=spec, host_file=str(tmp_path / "etc" / "main.config"),
                  home_file=".usher/main.config", env_var="USHER_MAIN_CONFIG")
    fields.update(changes)
    return ComponentSpec(**fields)


# --- Sections ------------------------------------------------------------------

def test_values_live_in_sections_and_subsections(tmp_path):
    config = load(tmp_path, """
        [main]
        text = top
        [[sub]]
        text = inner
        [[[deeper]]]
        copy = deepest
        [[items]]
        [[[first]]]
        required = a
        [[[second]]]
        required = b
    """)
    assert config["main"]["text"] == "top"
    assert config["main"]["sub"]["text"] == "inner"
    assert config["main"]["sub"]["deeper"]["copy"] == "deepest"
    assert config["main"]["items"] == {
        "first": {"text": None, "copy": None, "required": "a"},
        "second": {"text": None, "copy": None, "required": "b"},
    }


def test_parent_variables_are_not_values_of_a_subsection(tmp_path):
    config = load(tmp_path, """
        [main]
        other = only in parent
        [[sub]]
    """)
    assert "other" not in config["main"]["sub"]


def test_absent_sections_get_their_defaults(tmp_path):
    config = load(tmp_path, "")
    assert config["main"]["number"] == 7
    assert config["main"]["sub"] == {"text": None, "copy": None, "number": None,
                                     "deeper": {"copy": None}}
    assert config["main"]["items"] == {}


# --- Interpolation -----------------------------------------------------------------

def test_interpolation_within_a_section(tmp_path):
    config = load(tmp_path, """
        [main]
        other = world
        text = hello ${other}!
    """)
    assert config["main"]["text"] == "hello world!"


def test_a_subsection_sees_its_parents_variables(tmp_path):
    config = load(tmp_path, """
        [main]
        other = val1
        [[sub]]
        text = ${other}
        [[[deeper]]]
        copy = ${other} and ${text}
    """)
    assert config["main"]["sub"]["text"] == "val1"
    assert config["main"]["sub"]["deeper"]["copy"] == "val1 and val1"


def test_the_nearest_definition_wins(tmp_path):
    config = load(tmp_path, """
        [main]
        text = outer
        [[sub]]
        text = inner
        copy = ${text}
    """)
    assert config["main"]["sub"]["copy"] == "inner"


def test_interpolation_sees_declared_defaults(tmp_path):
    config = load(tmp_path, """
        [main]
        [[sub]]
        copy = ${text}/${number}/${names}
    """, spec=SPEC.replace("names = list(default=list())", "names = list(default=list('a', 'b'))"))
    assert config["main"]["sub"]["copy"] == "fallback/7/a, b"


def test_a_referenced_value_is_interpolated_too(tmp_path):
    config = load(tmp_path, """
        [main]
        where = /srv/${other}
        other = usher
        text = ${where}/log
    """)
    assert config["main"]["text"] == "/srv/usher/log"


def test_double_dollar_escapes_interpolation(tmp_path):
    config = load(tmp_path, """
        [main]
        text = $${other} costs $5
    """)
    assert config["main"]["text"] == "${other} costs $5"


def test_interpolation_casts_the_result(tmp_path):
    config = load(tmp_path, """
        [main]
        text = 42
        [[sub]]
        number = ${text}
    """)
    assert config["main"]["sub"]["number"] == 42


# --- __allsecs__ ----------------------------------------------------------------

def test_allsecs_adds_its_variables_to_every_sibling(tmp_path):
    config = load(tmp_path, """
        [main]
        [[items]]
        [[[__allsecs__]]]
        text = shared
        required = yes
        [[[first]]]
        [[[second]]]
    """)
    items = config["main"]["items"]
    assert set(items) == {"first", "second"}
    assert items["first"]["text"] == items["second"]["text"] == "shared"
    assert items["first"]["required"] == items["second"]["required"] == "yes"


def test_allsecs_does_not_replace_a_variable_defined_there(tmp_path):
    config = load(tmp_path, """
        [main]
        [[items]]
        [[[__allsecs__]]]
        text = shared
        required = yes
        [[[first]]]
        text = own
        [[[second]]]
    """)
    assert config["main"]["items"]["first"]["text"] == "own"
    assert config["main"]["items"]["second"]["text"] == "shared"


def test_allsecs_reaches_only_its_own_nesting_level(tmp_path):
    config = load(tmp_path, """
        [main]
        [[__allsecs__]]
        copy = level two
        [[sub]]
        [[[deeper]]]
    """)
    assert config["main"]["sub"]["copy"] == "level two"
    assert config["main"]["sub"]["deeper"]["copy"] is None


def test_allsecs_options_must_suit_every_sibling(tmp_path):
    message = error_of(tmp_path, """
        [main]
        [[__allsecs__]]
        copy = level two
        [[sub]]
        [[items]]
    """)
    assert_located(message, tmp_path / "test.config", 3, "[main] [[items]] copy:")
    assert "unknown option (inherited from a __allsecs__ section)" in message


def test_allsecs_values_interpolate_in_each_receiving_section(tmp_path):
    config = load(tmp_path, """
        [main]
        [[items]]
        [[[__allsecs__]]]
        copy = /etc/usher/${text}.config
        [[[first]]]
        text = one
        required = x
        [[[second]]]
        text = two
        required = x
    """)
    assert config["main"]["items"]["first"]["copy"] == "/etc/usher/one.config"
    assert config["main"]["items"]["second"]["copy"] == "/etc/usher/two.config"


def test_top_level_allsecs_applies_to_top_level_sections(tmp_path):
    config = load(tmp_path, """
        [__allsecs__]
        text = everywhere
        [main]
    """)
    assert config["main"]["text"] == "everywhere"
    assert "__allsecs__" not in config


# --- Values: spaces, quotes, None, triple quotes, comments ---------------------------

def test_unquoted_values_keep_their_spaces(tmp_path):
    config = load(tmp_path, """
        [main]
        text = bar is good
    """)
    assert config["main"]["text"] == "bar is good"


@pytest.mark.parametrize("written", ["'bar is bad'", '"bar is bad"', "it's", "'a', 'b'"])
def test_quotes_are_kept_literally(tmp_path, written):
    config = load(tmp_path, f"""
        [main]
        text = {written}
    """)
    assert config["main"]["text"] == written


@pytest.mark.parametrize("written", ["'None'", '"None"', "'''None'''", '"""None"""'])
def test_quoted_none_is_the_string_none(tmp_path, written):
    config = load(tmp_path, f"""
        [main]
        text = {written}
        other = {written}
    """)
    assert config["main"]["text"] == "None"
    assert config["main"]["other"] == "None"


def test_bare_none_means_no_value(tmp_path):
    config = load(tmp_path, """
        [main]
        other = None
        where = None
    """)
    assert config["main"]["other"] is None
    assert config["main"]["where"] is None


def test_bare_none_overrides_an_earlier_file(tmp_path):
    write(tmp_path, "etc/main.config", """
        [main]
        other = set by the host
    """)
    home = tmp_path / "alice"
    write(home, ".usher/main.config", """
        [main]
        other = None
    """)
    config = load_config(component(tmp_path), env={}, home=str(home))
    assert config["main"]["other"] is None


def test_triple_quotes_span_lines_and_are_stripped(tmp_path):
    config = load(tmp_path, """
        [main]
        text = '''first line
        second line # not a comment
        third'''
        other = \"\"\"double \"quoted\" # kept\"\"\"
    """)
    assert config["main"]["text"] == "first line\nsecond line # not a comment\nthird"
    assert config["main"]["other"] == 'double "quoted" # kept'


def test_comments(tmp_path):
    config = load(tmp_path, """
        # A comment before any section.
        [main]   # a comment after a header
            # an indented comment
        text = value # an inline comment
        # other = never read
    """)
    assert config["main"]["text"] == "value"
    assert config["main"]["other"] is None


def test_windows_line_endings_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "dos.config"
    path.write_bytes(b"\xef\xbb\xbf[main]\r\ntext = dos\r\nnumber = 9\r\n")
    config = load_plugin_config(SPEC, str(path))
    assert (config["main"]["text"], config["main"]["number"]) == ("dos", 9)


# --- Casting and defaults -----------------------------------------------------------

def test_values_are_cast_by_the_spec(tmp_path):
    config = load(tmp_path, """
        [main]
        number = 42
        ratio = 2.5
        flag = yes
        names = a, b c ,d,
        where = ~/data
        level = high
    """)
    main = config["main"]
    assert main["number"] == 42 and isinstance(main["number"], int)
    assert main["ratio"] == 2.5
    assert main["flag"] is True
    assert main["names"] == ["a", "b c", "d"]
    assert main["where"] == "/home/alice/data"
    assert main["level"] == "high"


@pytest.mark.parametrize("written, expected", [
    ("true", True), ("On", True), ("1", True), ("no", False), ("off", False), ("0", False)])
def test_boolean_spellings(tmp_path, written, expected):
    assert load(tmp_path, f"[main]\nflag = {written}\n")["main"]["flag"] is expected


def test_an_empty_list(tmp_path):
    assert load(tmp_path, "[main]\nnames =\n")["main"]["names"] == []


def test_defaults_apply_to_missing_options(tmp_path):
    main = load(tmp_path, "[main]\n")["main"]
    assert main == {"text": "fallback", "other": None, "number": 7, "ratio": 0.5,
                    "flag": False, "names": [], "where": None, "level": "low",
                    "sub": {"text": None, "copy": None, "number": None,
                            "deeper": {"copy": None}},
                    "items": {}}


def test_path_defaults_are_expanded_with_the_given_home(tmp_path):
    config = load_config(dataclasses.replace(settings.USH, host_file=str(tmp_path / "none")),
                         env={}, home=str(tmp_path / "bob"))
    assert config["ush"]["history_file"] == str(tmp_path / "bob" / ".ush_history")


# --- Search order ------------------------------------------------------------------

def test_files_override_each_other_host_home_env_explicit(tmp_path):
    home = tmp_path / "alice"
    write(tmp_path, "etc/main.config", """
        [main]
        text = host
        other = host
        number = 1
        ratio = 1
        [[sub]]
        text = host sub
        copy = host sub
    """)
    write(home, ".usher/main.config", """
        [main]
        other = home
        number = 2
        ratio = 2
        [[sub]]
        copy = home sub
    """)
    env_file = write(tmp_path, "env.config", """
        [main]
        number = 3
        ratio = 3
    """)
    explicit = write(tmp_path, "explicit.config", """
        [main]
        ratio = 4
    """)
    config = load_config(component(tmp_path), extra_files=[explicit],
                         env={"USHER_MAIN_CONFIG": env_file}, home=str(home))
    main = config["main"]
    assert (main["text"], main["other"], main["number"], main["ratio"]) == (
        "host", "home", 3, 4.0)
    assert main["sub"]["text"] == "host sub"
    assert main["sub"]["copy"] == "home sub"


def test_config_files_lists_the_search_order(tmp_path):
    files = config_files(settings.CTRL, extra_files=["/tmp/x.config"],
                         env={"USHER_CTRL_CONFIG": "/srv/ctrl.config"}, home="/home/alice")
    assert files == [("/etc/usher/ctrl.config", False),
                     ("/home/alice/.usher/ctrl.config", False),
                     ("/srv/ctrl.config", True),
                     ("/tmp/x.config", True)]
    assert config_files(settings.LNM, env={}, home="/root")[1][0] == "/root/.usher/lnm.config"
    assert settings.USH.env_var == "USHER_USH_CONFIG"


def test_missing_default_files_are_skipped(tmp_path):
    config = load_config(component(tmp_path), env={}, home=str(tmp_path / "nobody"))
    assert config["main"]["number"] == 7


def test_allsecs_in_one_file_applies_to_sections_of_another(tmp_path):
    write(tmp_path, "etc/main.config", """
        [main]
        [[items]]
        [[[__allsecs__]]]
        required = from host
    """)
    extra = write(tmp_path, "extra.config", """
        [main]
        [[items]]
        [[[mine]]]
    """)
    config = load_config(component(tmp_path), extra_files=[extra], env={},
                         home=str(tmp_path))
    assert config["main"]["items"]["mine"]["required"] == "from host"


# --- Errors name the file, the line and the key ------------------------------------

def assert_located(message, path, line, subject):
    assert message.startswith(f"{path}:{line}: {subject}"), message


def test_error_type(tmp_path):
    message = error_of(tmp_path, "[main]\n\n[[sub]]\nnumber = abc\n")
    assert_located(message, tmp_path / "test.config", 4, "[main] [[sub]] number:")
    assert "'abc' is not an integer" in message


@pytest.mark.parametrize("line, problem", [
    ("number = 0", "below the minimum 1"),
    ("number = 101", "above the maximum 100"),
    ("ratio = 0", "must be greater than 0"),
    ("ratio = nan", "not a finite number"),
    ("ratio = fast", "not a number"),
    ("flag = maybe", "not a boolean"),
    ("level = hihg", "not one of: low, high (did you mean high?)"),
    ("where = ''''''", "a path cannot be empty"),
])
def test_error_values(tmp_path, line, problem):
    message = error_of(tmp_path, f"[main]\n{line}\n")
    assert_located(message, tmp_path / "test.config", 2, f"[main] {line.split()[0]}:")
    assert problem in message


def test_error_quoted_number_names_the_quotes(tmp_path):
    message = error_of(tmp_path, "[main]\nnumber = '5'\n")
    assert "\"'5'\" is not an integer" in message


def test_error_none_where_a_value_is_required(tmp_path):
    message = error_of(tmp_path, "[main]\nnumber = None\n")
    assert_located(message, tmp_path / "test.config", 2, "[main] number:")
    assert "None is not allowed" in message


def test_error_unknown_option_suggests_the_right_one(tmp_path):
    message = error_of(tmp_path, "[main]\ntext = a\nnubmer = 3\n")
    assert_located(message, tmp_path / "test.config", 3, "[main] nubmer:")
    assert "unknown option (did you mean number?)" in message


def test_error_unknown_option_without_a_close_match(tmp_path):
    message = error_of(tmp_path, "[main]\nzzz = 3\n")
    assert message.endswith("[main] zzz: unknown option")


def test_error_unknown_section(tmp_path):
    message = error_of(tmp_path, "[main]\n[[sbu]]\n")
    assert_located(message, tmp_path / "test.config", 2, "[main] [[sbu]]:")
    assert "unknown section (did you mean [main] [[sub]]?)" in message


def test_error_option_outside_a_section(tmp_path):
    path = write(tmp_path, "main.config", "number = 3\n[main]\n")
    with pytest.raises(ConfigError, match=r"main.config:1: number: option outside any "
                                          r"section \(put it under \[main\]\)"):
        load_config(component(tmp_path), extra_files=[path], env={}, home=str(tmp_path))


def test_error_section_written_as_an_option_and_the_reverse(tmp_path):
    assert "[main] sub: is a section: write it as [[sub]]" in error_of(
        tmp_path, "[main]\nsub = x\n")
    assert "[main] [[number]]: number is an option, not a section" in error_of(
        tmp_path, "[main]\n[[number]]\n")


def test_error_undefined_interpolation(tmp_path):
    message = error_of(tmp_path, "[main]\n[[sub]]\ntext = ${nothing}/x\n")
    assert_located(message, tmp_path / "test.config", 3, "[main] [[sub]] text:")
    assert "${nothing} is not defined" in message


def test_error_interpolation_does_not_look_into_subsections(tmp_path):
    message = error_of(tmp_path, "[main]\ntext = ${copy}\n[[sub]]\ncopy = x\n")
    assert "${copy} is not defined" in message


def test_error_interpolation_loop(tmp_path):
    message = error_of(tmp_path, "[main]\ntext = ${other}\nother = ${text}\n")
    assert "interpolation loop: text -> ${other} -> ${text}" in message


def test_error_interpolating_none(tmp_path):
    message = error_of(tmp_path, "[main]\nother = None\ntext = ${other}\n")
    assert_located(message, tmp_path / "test.config", 3, "[main] text:")
    assert "${other} is None" in message


def test_error_unclosed_reference(tmp_path):
    assert "'${' without a closing '}'" in error_of(tmp_path, "[main]\ntext = ${other\n")


def test_error_parse_names_the_key(tmp_path):
    message = error_of(tmp_path, "[main]\n[[sub]]\ntext = 'quoted' tail\n")
    assert_located(message, tmp_path / "test.config", 3, "[main] [[sub]] text:")
    assert "cannot parse value" in message


def test_error_unclosed_triple_quote(tmp_path):
    message = error_of(tmp_path, "[main]\ntext = '''never\nclosed\n")
    assert_located(message, tmp_path / "test.config", 2, "[main] text:")
    assert "never closed" in message


def test_error_duplicate_option_and_section(tmp_path):
    message = error_of(tmp_path, "[main]\ntext = a\ntext = b\n")
    assert_located(message, tmp_path / "test.config", 3, "[main] text:")
    assert "set twice" in message
    message = error_of(tmp_path, "[main]\n[main]\n")
    assert_located(message, tmp_path / "test.config", 2, "[main]:")


def test_error_bad_nesting_and_bad_lines(tmp_path):
    message = error_of(tmp_path, "[main]\n[[[deeper]]]\n")
    assert_located(message, tmp_path / "test.config", 2, "[main]:")
    assert "too nested" in message
    message = error_of(tmp_path, "[main]\nnot a key value line\n")
    assert_located(message, tmp_path / "test.config", 2, "[main]:")


def test_error_missing_required_option_names_its_section(tmp_path):
    message = error_of(tmp_path, "[main]\n[[items]]\n\n[[[thing]]]\ntext = x\n")
    assert_located(message, tmp_path / "test.config", 4, "[main] [[items]] [[[thing]]] required:")
    assert "required option is missing" in message


def test_error_inherited_from_allsecs_says_so(tmp_path):
    spec = SPEC.replace("[[items]]\n[[[__many__]]]\n",
                        "[[items]]\n[[[__many__]]]\nsize = integer(default=None)\n")
    message = error_of(tmp_path, """
        [main]
        [[items]]
        [[[__allsecs__]]]
        size = big
        [[[thing]]]
        required = x
    """, spec)
    assert_located(message, tmp_path / "test.config", 4, "[main] [[items]] [[[thing]]] size:")
    assert "inherited from a __allsecs__ section" in message


def test_error_names_the_file_that_set_the_value(tmp_path):
    write(tmp_path, "etc/main.config", "[main]\ntext = fine\n")
    bad = write(tmp_path, "bad.config", "[main]\n\nnumber = many\n")
    with pytest.raises(ConfigError) as caught:
        load_config(component(tmp_path), env={"USHER_MAIN_CONFIG": bad}, home=str(tmp_path))
    assert_located(str(caught.value), bad, 3, "[main] number:")


def test_error_unreadable_or_missing_named_files(tmp_path):
    missing = str(tmp_path / "absent.config")
    with pytest.raises(ConfigError, match=re.escape(missing) + ": cannot read"):
        load_config(component(tmp_path), env={"USHER_MAIN_CONFIG": missing},
                    home=str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(missing) + ": cannot read"):
        load_config(component(tmp_path), extra_files=[missing], env={}, home=str(tmp_path))
    binary = tmp_path / "binary.config"
    binary.write_bytes(b"[main]\ntext = \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(component(tmp_path), extra_files=[str(binary)], env={},
                    home=str(tmp_path))


def test_config_error_is_the_shared_error_class():
    assert ConfigError is errors.ConfigError


# --- Plugin configuration files --------------------------------------------------

# Plugins declare flat specs (their options at the top of their own file).
PLUGIN_SPEC = """
honour_suggestion = boolean(default=True)
memory_overcommit = float(gt=0, default=1.0)
"""


def test_plugin_config_is_read_by_the_same_rules(tmp_path):
    path = write(tmp_path, "rr.config", """
        # Round-robin placement.
        honour_suggestion = no
        memory_overcommit = ${order}.5
        order = 20
    """)
    assert load_plugin_config(PLUGIN_SPEC, path) == {
        "honour_suggestion": False, "memory_overcommit": 20.5, "order": 20}


def test_plugin_config_order_defaults_to_the_plugins_own(tmp_path):
    spec = PLUGIN_SPEC + "order = integer(default=50)\n"
    assert load_plugin_config(spec, None)["order"] == 50
    assert load_plugin_config(PLUGIN_SPEC, None)["order"] is None


def test_plugin_config_without_a_file_is_its_defaults():
    assert load_plugin_config({"honour_suggestion": "boolean(default=True)"}, None) == {
        "honour_suggestion": True, "order": None}


def test_plugin_without_a_spec_accepts_only_order(tmp_path):
    assert load_plugin_config(None, None) == {"order": None}
    path = write(tmp_path, "p.config", "order = 5\n")
    assert load_plugin_config(None, path) == {"order": 5}
    path = write(tmp_path, "p.config", "order = 5\ncolour = red\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2: colour: unknown option")):
        load_plugin_config(None, path)


def test_plugin_config_with_sections(tmp_path):
    path = write(tmp_path, "db.config", "order = 3\n[database]\nhost = db.example.org\n")
    spec = "[database]\nhost = string(default='localhost')\nport = integer(default=5432)\n"
    assert load_plugin_config(spec, path) == {
        "order": 3, "database": {"host": "db.example.org", "port": 5432}}


def test_plugin_config_errors_name_the_file(tmp_path):
    path = write(tmp_path, "rr.config", "# placement\nhonour_sugestion = no\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}:2: honour_sugestion: unknown option (did you mean honour_suggestion?)")):
        load_plugin_config(PLUGIN_SPEC, path)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'absent'}: cannot read")):
        load_plugin_config(PLUGIN_SPEC, str(tmp_path / "absent"))


def test_plugin_config_required_option_without_a_file():
    with pytest.raises(ConfigError, match=r"plugin configuration: \[db\] url: required"):
        load_plugin_config("[db]\nurl = string()\n", None)


def test_spec_in_text_and_as_a_mapping_agree():
    assert parse_spec("[a]\nb = boolean(default=True)\n") == parse_spec(
        {"a": {"b": "boolean(default=True)"}})


# --- The components' settings and sample files --------------------------------------

COMPONENTS = [settings.CTRL, settings.LNM, settings.USH, settings.PLUSHER, settings.WEB]


def without_host_file(spec, tmp_path):
    return dataclasses.replace(spec, host_file=str(tmp_path / "no-such-file"))


@pytest.mark.parametrize("spec", COMPONENTS, ids=lambda spec: spec.name)
def test_sample_file_loads_and_states_the_defaults(tmp_path, spec):
    sample = ETC / f"{spec.name}.config.orig"
    home = str(tmp_path / "home")
    from_sample = load_config(dataclasses.replace(spec, host_file=str(sample)), env={},
                              home=home)
    defaults = load_config(without_host_file(spec, tmp_path), env={}, home=home)
    assert from_sample == defaults


@pytest.mark.parametrize("spec", COMPONENTS, ids=lambda spec: spec.name)
def test_sample_file_documents_every_option(spec):
    sample = (ETC / f"{spec.name}.config.orig").read_text(encoding="utf-8")
    lines = sample.splitlines()
    for option, check in parse_spec(spec.spec)[spec.name].items():
        if not isinstance(check, str):
            continue
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{option} ="))
        above = [line for line in lines[max(0, index - 6):index] if line.startswith("# ")]
        assert above, f"{option} has no comment in {spec.name}.config.orig"


def test_ctrl_settings(tmp_path):
    ctrl = load_config(without_host_file(settings.CTRL, tmp_path), env={},
                       home=str(tmp_path))["ctrl"]
    assert settings.CTRL.section == "[ctrl]"
    assert (ctrl["domain"], ctrl["client_port"], ctrl["lnm_port"]) == ("usher.local", 7390, 7391)
    assert ctrl["auth_modules"] == ["local"] and ctrl["admins"] == []
    assert ctrl["call_timeout"] == 30.0 and isinstance(ctrl["call_timeout"], float)
    assert ctrl["plugin_dir"] is None and ctrl["log_file"] is None
    assert ctrl["plugins"] == settings.default_plugin_registrations()


def test_ctrl_plugins_section(tmp_path):
    path = write(tmp_path, "ctrl.config", """
        [ctrl]
        state_dir = /srv/usher
        [[plugins]]
        [[[__allsecs__]]]
        order = 50
        [[[placement]]]
        plugin = leastloaded
        events = start_request
        [[[dns]]]
        events = register_vm, destroy_vm
        config = ${state_dir}/dns.config
        order = 90
    """)
    plugins = load_config(without_host_file(settings.CTRL, tmp_path), extra_files=[path],
                          env={}, home=str(tmp_path))["ctrl"]["plugins"]
    assert plugins == {
        "placement": {"plugin": "leastloaded", "events": ["start_request"], "config": None,
                      "order": 50},
        "dns": {"plugin": "dns", "events": ["register_vm", "destroy_vm"],
                "config": "/srv/usher/dns.config", "order": 90},
    }


def test_an_empty_plugins_section_registers_nothing(tmp_path):
    path = write(tmp_path, "ctrl.config", "[ctrl]\n[[plugins]]\n")
    ctrl = load_config(without_host_file(settings.CTRL, tmp_path), extra_files=[path],
                       env={}, home=str(tmp_path))["ctrl"]
    assert ctrl["plugins"] == {}


def test_open_authorization_covers_every_request_event_of_the_controller():
    from usher.controller import events
    assert set(settings.REQUEST_EVENTS) == set(events.REQUEST_EVENTS)


def test_default_registrations_are_fresh_data():
    first = settings.default_plugin_registrations()
    first["roundrobin"]["events"].append("changed")
    assert "changed" not in settings.default_plugin_registrations()["roundrobin"]["events"]
    assert set(settings.REQUEST_EVENTS) <= set(first["open_authz"]["events"])


def test_lnm_and_ush_settings(tmp_path):
    lnm = load_config(without_host_file(settings.LNM, tmp_path), env={},
                      home=str(tmp_path))["lnm"]
    assert (lnm["controller_port"], lnm["recovery_port"], lnm["threads"]) == (7391, 7392, 4)
    assert lnm["libvirt_uri"] is None and lnm["report_interval"] == 0.2
    ush = load_config(without_host_file(settings.USH, tmp_path), env={},
                      home=str(tmp_path))["ush"]
    assert (ush["controller_port"], ush["clusters"], ush["password"]) == (7390, [], None)


def test_ctrl_typo_example(tmp_path):
    path = write(tmp_path, "ctrl.config", "[ctrl]\nclient_port = abc\n")
    with pytest.raises(ConfigError) as caught:
        load_config(without_host_file(settings.CTRL, tmp_path), extra_files=[path], env={},
                    home=str(tmp_path))
    assert str(caught.value) == f"{path}:2: [ctrl] client_port: 'abc' is not an integer"


def test_a_log_file_that_cannot_be_opened_is_a_configuration_error(tmp_path):
    from usher import daemon
    missing = tmp_path / "no" / "such" / "dir" / "usherctrl.log"
    with pytest.raises(ConfigError, match=f"log_file {missing}: cannot open it: No such file"):
        daemon.start_logging(str(missing), "info")

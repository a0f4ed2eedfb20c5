"""Usher's configuration files.

The rules are those of the Usher documentation ("Configuration Files"):

- ``key = value`` pairs inside ``[section]`` headers; ``[[subsection]]`` and
  deeper nest by the number of brackets; ``#`` starts a comment.
- Values are strings, unquoted even when they contain spaces. Quotes are kept
  literally (``foo = 'bar'`` is the five characters ``'bar'``), except:
  triple-quoted values (which may span lines) lose their quotes, and a quoted
  ``'None'`` is the string ``None`` while a bare ``None`` means "no value"
  (Python ``None``).
- ``${name}`` is replaced by the value of ``name`` in the same section or, if
  it is not set there, in the nearest enclosing section (an option's declared
  default counts as set). ``$${`` writes a literal ``${``.
- The variables of a section called ``__allsecs__`` are added to every sibling
  section (same parent, same nesting level) that does not set them itself.
- Every value is cast by a specification declared in code: a configspec in
  the ``configobj``/``validate`` format with the checks ``string``,
  ``integer``, ``float``, ``boolean``, ``option``, ``list`` (comma-separated)
  and ``path`` (``~`` expanded). ``__many__`` in a spec stands for any name.

Parsing is ConfigObj's (``list_values=False`` gives exactly the quoting rules
above); this module adds what ConfigObj lacks for Usher: the line of every
value, ``None`` handling, ``${}`` interpolation through enclosing sections,
``__allsecs__``, merging several files, rejecting unknown keys, and errors
that name the file, the line and the key.

A component reads, in order, later values overriding earlier ones key by key:
the host-wide file, the file in the user's home, the file named by an
environment variable, then any files given explicitly (``--config``).

It is about 600 lines because these rules are one job: splitting the
parser from the checks would spread one file's rules over two modules.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping

from configobj import ConfigObj, ConfigObjError, DuplicateError, NestingError, validate

from usher.errors import ConfigError

__all__ = [
    "ALLSECS",
    "ComponentSpec",
    "ConfigError",
    "config_files",
    "load_config",
    "load_plugin_config",
    "parse_spec",
]

ALLSECS = "__allsecs__"
MANY = "__many__"

# Every plugin configuration may set its position on event chains.
PLUGIN_ORDER_CHECK = "integer(default=None)"

Spec = Mapping[str, "str | Spec"]


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """What a component reads: its configspec and where its files live.

    ``spec`` is configspec text or a nested mapping of check strings.
    ``home_file`` is relative to the user's home directory.
    ``absent_section_defaults`` maps a section path (e.g. ``("ctrl",
    "plugins")``) to a function giving its typed content when no file has
    that section at all (an empty section stays empty). ``finalize`` may
    complete the typed result in place.
    """

    name: str
    spec: str | Spec
    host_file: str
    home_file: str
    env_var: str
    absent_section_defaults: Mapping[tuple[str, ...], Callable[[], dict]] = dataclasses.field(
        default_factory=dict)
    finalize: Callable[[dict], None] | None = None

    @property
    def section(self) -> str:
        return f"[{self.name}]"


def parse_spec(spec: str | Spec) -> dict:
    """Return a configspec (text or mapping) as nested plain dicts of check strings."""
    if isinstance(spec, str):
        try:
            parsed = ConfigObj(spec.splitlines(), list_values=False, interpolation=False,
                               raise_errors=True, _inspec=True)
        except ConfigObjError as error:
            raise ValueError(f"invalid configuration spec: {error}") from error
        return _plain(parsed)
    if isinstance(spec, Mapping):
        return _plain(spec)
    raise TypeError(f"a configuration spec is text or a mapping, not {type(spec).__name__}")


def _plain(mapping: Mapping) -> dict:
    result = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            result[key] = _plain(value)
        elif isinstance(value, str):
            result[key] = value
        else:
            raise TypeError(f"spec entry {key!r} must be a check string or a mapping")
    return result


def config_files(component: ComponentSpec, extra_files: Iterable[str] = (),
                 env: Mapping[str, str] | None = None,
                 home: str | None = None, isolated: bool = False) -> list[tuple[str, bool]]:
    """The files ``load_config`` reads, in order, as (path, must_exist).

    ``isolated`` reads only ``extra_files`` (the sandbox and tests use it so
    that a machine's own /etc/usher cannot leak in)."""
    env = os.environ if env is None else env
    home = os.path.expanduser("~") if home is None else home
    files = []
    if not isolated:
        files = [(component.host_file, False),
                 (os.path.join(home, component.home_file), False)]
        named = env.get(component.env_var)
        if named:
            files.append((named, True))
    files.extend((os.fspath(path), True) for path in extra_files)
    return files


def load_config(component: ComponentSpec, extra_files: Iterable[str] = (),
                env: Mapping[str, str] | None = None,
                home: str | None = None, isolated: bool = False) -> dict:
    """Read a component's configuration files and return a typed nested dict.

    ``env`` defaults to ``os.environ`` and ``home`` to the user's home
    directory; tests pass both. Raises ConfigError for anything invalid.
    """
    home = os.path.expanduser("~") if home is None else home
    merged = _Section()
    for path, must_exist in config_files(component, extra_files, env, home, isolated):
        if not must_exist and not os.path.exists(path):
            continue
        _merge(merged, _read_tree(path))
    _expand_allsecs(merged)
    checker = _Checker(home, component.absent_section_defaults,
                       origin=f"{component.name} configuration")
    result = checker.check_section(merged, parse_spec(component.spec), ())
    if component.finalize is not None:
        component.finalize(result)
    return result


def load_plugin_config(spec: str | Spec | None, path: str | None,
                       home: str | None = None) -> dict:
    """Read a plugin's own configuration file (or only its defaults if
    ``path`` is None) by the same rules, against the plugin's ``CONFIG_SPEC``
    (None: the plugin has no options). Every plugin configuration accepts a
    top-level ``order`` (an integer, default None) unless its spec declares
    one."""
    home = os.path.expanduser("~") if home is None else home
    declared = parse_spec(spec if spec is not None else {})
    declared.setdefault("order", PLUGIN_ORDER_CHECK)
    tree = _Section() if path is None else _read_tree(os.fspath(path))
    _expand_allsecs(tree)
    origin = "plugin configuration" if path is None else f"{path}"
    return _Checker(home, {}, origin=origin).check_section(tree, declared, ())


# --- Reading one file -------------------------------------------------------

class UsherConfigObj(ConfigObj):
    """ConfigObj with Usher's settings that also records where things are.

    After parsing, ``value_lines[(section_path, key)]`` is ``(line,
    triple_quoted)`` and ``section_lines[section_path]`` the header's line
    (1-based). ConfigObj keeps neither, and a triple-quoted ``'''None'''``
    is otherwise indistinguishable from a bare ``None``.
    """

    def __init__(self, lines: list[str]):
        super().__init__(lines, list_values=False, interpolation=False, raise_errors=True)

    def _parse(self, infile):
        super()._parse(infile)
        # Reached only when ConfigObj accepted the file, so every line is a
        # blank, a comment, a section header or a key line it also matched.
        self.value_lines = {}
        self.section_lines = {}
        path: list[str] = []
        index = 0
        while index < len(infile):
            line = infile[index]
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                header = self._sectionmarker.match(line)
                if header is not None:
                    depth = header.group(2).count("[")
                    path = path[:depth - 1] + [self._unquote(header.group(3))]
                    self.section_lines[tuple(path)] = index + 1
                else:
                    _, key, value = self._keyword.match(line).groups()
                    start = index
                    triple = value[:3] in ('"""', "'''")
                    if triple:
                        _, _, index = self._multiline(value, infile, index, len(infile) - 1)
                    self.value_lines[(tuple(path), self._unquote(key))] = (start + 1, triple)
            index += 1


@dataclasses.dataclass
class _Value:
    text: str | None  # None: a bare None ("no value")
    file: str
    line: int
    inherited: bool = False  # copied from an __allsecs__ section


@dataclasses.dataclass
class _Section:
    file: str | None = None
    line: int | None = None
    values: dict[str, _Value] = dataclasses.field(default_factory=dict)
    sections: dict[str, _Section] = dataclasses.field(default_factory=dict)


def _read_tree(path: str) -> _Section:
    try:
        with open(path, encoding="utf-8-sig") as stream:
            lines = stream.read().splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read configuration file: not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(
            f"{path}: cannot read configuration file: {error.strerror or error}") from None
    try:
        parsed = UsherConfigObj(lines)
    except ConfigObjError as error:
        raise _parse_error(path, lines, error) from None
    return _tree_from(parsed, parsed, (), path)


def _tree_from(parsed: UsherConfigObj, section, path: tuple[str, ...], file: str) -> _Section:
    node = _Section(file=file, line=parsed.section_lines.get(path))
    for key in section.scalars:
        line, triple = parsed.value_lines[(path, key)]
        node.values[key] = _Value(_literal(section[key], triple), file, line)
    for name in section.sections:
        node.sections[name] = _tree_from(parsed, section[name], path + (name,), file)
    return node


def _literal(text: str, triple_quoted: bool) -> str | None:
    """Apply the None rules to a value as ConfigObj returned it."""
    if triple_quoted:
        return text
    if text == "None":
        return None
    if text in ("'None'", '"None"'):
        return "None"
    return text


def _parse_error(path: str, lines: list[str], error: ConfigObjError) -> ConfigError:
    line_number = getattr(error, "line_number", None)
    if not line_number:
        return ConfigError(f"{path}: {error}")
    # ConfigObj's messages end in " at line N."; we put the line up front.
    reason = re.sub(r" at line \d+\.$", "", str(error))
    line = lines[line_number - 1]
    section = _format_path(_section_path_at(lines, line_number - 1))
    keyword = ConfigObj._keyword.match(line)
    header = ConfigObj._sectionmarker.match(line)
    if isinstance(error, DuplicateError) and header is not None:
        subject, problem = section, "section defined twice in this file"
    elif isinstance(error, NestingError):
        subject = _format_path(_section_path_at(lines, line_number - 2)) if line_number > 1 else ""
        problem = (f"bad section header {line.strip()!r}: {reason.lower()} (a subsection "
                   f"needs one more bracket than its parent, and the brackets must match)")
    elif keyword is not None and header is None:
        key = keyword.group(2).strip("'\"")
        subject = f"{section} {key}".strip()
        if isinstance(error, DuplicateError):
            problem = "option set twice in this section"
        elif "multiline" in reason:
            problem = "triple-quoted value is never closed"
        else:
            problem = (f"cannot parse value {keyword.group(3)!r}: a value that starts with "
                       f"a quote must end with it (quotes are kept; use triple quotes "
                       f"for a value that has '#' or quotes in it)")
    else:
        subject = section
        problem = f"expected 'key = value' or a [section] header, not {line.strip()!r}"
    return ConfigError(_located(path, line_number, subject, problem))


def _section_path_at(lines: list[str], index: int) -> tuple[str, ...]:
    """The section in force at a line, from the headers above it."""
    path: list[str] = []
    for line in lines[:index + 1]:
        header = ConfigObj._sectionmarker.match(line)
        if header is not None:
            depth = header.group(2).count("[")
            path = path[:depth - 1] + [header.group(3).strip("'\"")]
    return tuple(path)


# --- Combining files ----------------------------------------------------------

def _merge(into: _Section, new: _Section) -> None:
    """Later files win key by key, section by section."""
    if into.file is None:
        into.file, into.line = new.file, new.line
    into.values.update(new.values)
    for name, section in new.sections.items():
        if name in into.sections:
            _merge(into.sections[name], section)
        else:
            into.sections[name] = section


def _expand_allsecs(section: _Section) -> None:
    template = section.sections.pop(ALLSECS, None)
    if template is not None:
        for child in section.sections.values():
            _inherit(child, template)
    for child in section.sections.values():
        _expand_allsecs(child)


def _inherit(target: _Section, template: _Section) -> None:
    for key, value in template.values.items():
        if key not in target.values and key not in target.sections:
            target.values[key] = dataclasses.replace(value, inherited=True)
    for name, section in template.sections.items():
        if name in target.values:
            continue
        if name in target.sections:
            _inherit(target.sections[name], section)
        else:
            target.sections[name] = _copy_inherited(section)


def _copy_inherited(section: _Section) -> _Section:
    duplicate = copy.deepcopy(section)
    stack = [duplicate]
    while stack:
        node = stack.pop()
        for value in node.values.values():
            value.inherited = True
        stack.extend(node.sections.values())
    return duplicate


# --- Checking and casting ------------------------------------------------------

class _Invalid(validate.ValidateError):
    """A check failed; the message is the whole problem statement."""


_INTERPOLATION = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_PHRASES = {
    "integer": "an integer",
    "float": "a number",
    "boolean": "a boolean",
    "string": "a string",
    "list": "a comma-separated list",
    "path": "a path",
    "conninfo": "a libpq connection string",
    "option": "one of its allowed values",
}


class _Checker:
    """Checks a merged tree against a spec and returns typed values."""

    def __init__(self, home: str, absent_section_defaults: Mapping, origin: str):
        self._home = home
        self._absent_section_defaults = absent_section_defaults
        self._origin = origin
        self._validator = validate.Validator({
            "integer": self._integer,
            "float": self._float,
            "boolean": self._boolean,
            "string": self._string,
            "option": self._option,
            "list": self._list,
            "path": self._path,
            "conninfo": self._conninfo,
        })

    # Scopes are lists of (section or None, spec), outermost first: the chain
    # ``${}`` searches, innermost first.

    def check_section(self, node: _Section | None, spec: dict, path: tuple[str, ...],
                      scope: list | None = None) -> dict:
        scope = (scope or []) + [(node, spec)]
        values = node.values if node is not None else {}
        sections = node.sections if node is not None else {}
        option_specs = {k: v for k, v in spec.items() if isinstance(v, str) and k != MANY}
        section_specs = {k: v for k, v in spec.items() if isinstance(v, dict) and k != MANY}
        any_option = spec.get(MANY) if isinstance(spec.get(MANY), str) else None
        any_section = spec.get(MANY) if isinstance(spec.get(MANY), dict) else None

        for key, value in values.items():
            if key in option_specs or (any_option is not None and key not in section_specs):
                continue
            if key in section_specs:
                depth = len(path) + 1
                self._fail(value, path, key,
                           f"is a section: write it as {'[' * depth}{key}{']' * depth}")
            if not path and not option_specs and any_option is None:
                sections_hint = " or ".join(f"[{name}]" for name in section_specs)
                self._fail(value, path, key,
                           f"option outside any section (put it under {sections_hint})")
            self._fail(value, path, key, "unknown option" + _hint(key, option_specs))
        for name, section in sections.items():
            if name in section_specs or (any_section is not None and name not in option_specs):
                continue
            where = _Value(None, section.file, section.line)
            subject = _format_path(path + (name,))
            if name in option_specs:
                self._fail(where, (), subject, f"{name} is an option, not a section")
            self._fail(where, (), subject, "unknown section" + _hint(
                name, section_specs, lambda match: _format_path(path + (match,))))

        result = {}
        for key, check in option_specs.items():
            result[key] = self._check_option(values.get(key), check, path, key, scope)
        if any_option is not None:
            for key, value in values.items():
                if key not in option_specs and key not in section_specs:
                    result[key] = self._check_option(value, any_option, path, key, scope)
        for name, section_spec in section_specs.items():
            subpath = path + (name,)
            if name not in sections and subpath in self._absent_section_defaults:
                result[name] = self._absent_section_defaults[subpath]()
            else:
                result[name] = self.check_section(sections.get(name), section_spec, subpath,
                                                  scope)
        if any_section is not None:
            for name, section in sections.items():
                if name not in section_specs and name not in option_specs:
                    result[name] = self.check_section(section, any_section, path + (name,),
                                                      scope)
        return result

    def _check_option(self, value: _Value | None, check: str, path, key, scope):
        if value is None:
            try:
                return self._validator.check(check, None, missing=True)
            except validate.VdtMissingValue:
                self._fail(self._section_position(scope), path, key,
                           "required option is missing")
        if value.text is None:
            if self._nullable(check):
                return None
            self._fail(value, path, key,
                       f"None is not allowed here (expected {self._phrase(check)})")
        level = len(scope) - 1
        text = self._interpolate(value, level, scope, path, key, [(level, key)])
        try:
            return self._validator.check(check, text)
        except _Invalid as error:
            self._fail(value, path, key, str(error))
        except validate.ValidateError as error:
            self._fail(value, path, key, f"{text!r} is not {self._phrase(check)} ({error})")

    def _interpolate(self, value: _Value, level: int, scope, path, key, active) -> str:
        def replace(match):
            if match.group(0) == "$${":
                return "${"
            if match.group(1) is None:
                self._fail(value, path, key, "'${' without a closing '}'")
            name = match.group(1).strip()
            if not name:
                self._fail(value, path, key, "empty '${}' reference")
            return self._lookup(name, value, level, scope, path, key, active)

        return _INTERPOLATION.sub(replace, value.text)

    def _lookup(self, name, value, level, scope, path, key, active) -> str:
        for depth in range(level, -1, -1):
            node, spec = scope[depth]
            found = node.values.get(name) if node is not None else None
            if found is not None:
                if (depth, name) in active:
                    chain = " -> ".join(f"${{{n}}}" for _, n in active[1:] + [(depth, name)])
                    chain = f"{active[0][1]} -> {chain}"
                    self._fail(value, path, key, f"interpolation loop: {chain}")
                if found.text is None:
                    self._fail(value, path, key, f"${{{name}}} is None, which has no text")
                return self._interpolate(found, depth, scope, path[:depth], name,
                                         active + [(depth, name)])
            check = spec.get(name)
            if isinstance(check, str) and name != MANY:
                try:
                    default = self._validator.get_default_value(check)
                except KeyError:
                    continue
                if default is None:
                    continue
                if isinstance(default, list):
                    return ", ".join(default)
                return str(default)
        self._fail(value, path, key,
                   f"${{{name}}} is not defined in this section or an enclosing one")

    def _nullable(self, check: str) -> bool:
        try:
            return self._validator.get_default_value(check) is None
        except KeyError:
            return False

    def _phrase(self, check: str) -> str:
        return _PHRASES.get(check.split("(", 1)[0].strip(), f"valid for {check}")

    def _section_position(self, scope) -> _Value:
        for node, _ in reversed(scope):
            if node is not None and node.file is not None:
                return _Value(None, node.file, node.line)
        return _Value(None, None, None)

    def _fail(self, value: _Value, path, key, problem):
        if value.inherited:
            problem += f" (inherited from a {ALLSECS} section)"
        subject = f"{_format_path(path)} {key}".strip()
        if value.file is None:
            raise ConfigError(f"{self._origin}: {subject}: {problem}")
        raise ConfigError(_located(value.file, value.line, subject, problem))

    # Check functions for validate.Validator. Spec arguments arrive as text.

    def _integer(self, value, min=None, max=None):
        if isinstance(value, bool):
            raise _Invalid(f"{value!r} is not an integer")
        try:
            number = value if isinstance(value, int) else int(str(value).strip(), 10)
        except ValueError:
            raise _Invalid(f"{value!r} is not an integer") from None
        return _bounded(number, value, min, max, int)

    def _float(self, value, min=None, max=None, gt=None):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _Invalid(f"{value!r} is not a number") from None
        if not math.isfinite(number):
            raise _Invalid(f"{value!r} is not a finite number")
        if gt is not None and not number > float(gt):
            raise _Invalid(f"{value!r} must be greater than {gt}")
        return _bounded(number, value, min, max, float)

    def _boolean(self, value):
        try:
            return validate.is_boolean(value)
        except validate.ValidateError:
            raise _Invalid(f"{value!r} is not a boolean (use yes/no, true/false, on/off "
                           f"or 1/0)") from None

    def _string(self, value):
        if not isinstance(value, str):
            raise _Invalid(f"{value!r} is not a string")
        return value

    def _option(self, value, *allowed):
        if value not in allowed:
            raise _Invalid(f"{value!r} is not one of: {', '.join(allowed)}"
                           + _hint(str(value), allowed, lambda match: match))
        return value

    def _list(self, value, min=None, max=None):
        if isinstance(value, (list, tuple)):
            items = [str(item) for item in value]
        else:
            items = [item.strip() for item in str(value).split(",")]
            items = [item for item in items if item]
        if min is not None and len(items) < int(min):
            raise _Invalid(f"needs at least {min} comma-separated item"
                           f"{'' if int(min) == 1 else 's'}, got {len(items)}")
        if max is not None and len(items) > int(max):
            raise _Invalid(f"takes at most {max} items, got {len(items)}")
        return items

    def _conninfo(self, value):
        """A libpq connection string (``host=... dbname=...`` or a
        ``postgresql://`` URL). The value is never repeated in a message: it
        may hold a password."""
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise _Invalid("a connection string cannot be empty (write None for none)")
        try:
            from psycopg.conninfo import conninfo_to_dict
            conninfo_to_dict(value)
        except ImportError:
            raise _Invalid("needs psycopg (pip install 'psycopg[binary]')") from None
        except Exception:
            raise _Invalid("is not a libpq connection string (e.g. host=db1 port=5432 "
                           "dbname=usher user=usher)") from None
        return value.strip()

    def _path(self, value):
        if not isinstance(value, str) or not value.strip():
            raise _Invalid("a path cannot be empty (write None for no file)")
        value = value.strip()
        if value == "~" or value.startswith("~/"):
            return self._home + value[1:]
        return os.path.expanduser(value)


def _bounded(number, original, minimum, maximum, cast):
    if minimum is not None and number < cast(minimum):
        raise _Invalid(f"{original!r} is below the minimum {minimum}")
    if maximum is not None and number > cast(maximum):
        raise _Invalid(f"{original!r} is above the maximum {maximum}")
    return number


def _hint(name: str, candidates: Iterable[str], show=lambda match: match) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {show(matches[0])}?)" if matches else ""


def _format_path(path: tuple[str, ...]) -> str:
    return " ".join(f"{'[' * depth}{name}{']' * depth}"
                    for depth, name in enumerate(path, start=1))


def _located(file: str, line: int | None, subject: str, problem: str) -> str:
    where = f"{file}:{line}" if line else file
    return f"{where}: {subject}: {problem}" if subject else f"{where}: {problem}"

"""Selecting sets of VMs and LNMs: explicit names, ranges, regular
expressions and whole virtual clusters.

Ranges use brackets, as in pdsh and Slurm: ``[1-3,7].sneetch`` is
``1.sneetch 2.sneetch 3.sneetch 7.sneetch``; ``web[01-03]`` keeps the zero
padding. A regular expression is searched in the full VM name.

Every selection a peer sends is bounded as a whole (``Budget``): the names it
names, once its ranges are expanded, and the patterns (ranges and regular
expressions) it carries. A range's size is computed before a name is made, so
a request over the limit is refused before anything is allocated. Regular
expressions are RE2's (``google-re2``): matching takes time linear in the
name, whatever the pattern; backreferences and lookaround do not exist there.
"""

import collections
import itertools

import re2

from usher.errors import InvalidRequest, NoSuchLNM
from usher.naming import MAX_NAME

# Names one request may name, every range expanded (the controller's
# max_selection_names), and ranges plus regular expressions it may carry
# (max_selection_patterns).
MAX_NAMES = 10_000
MAX_PATTERNS = 32
# Characters of one name or range pattern, and of one regular expression.
MAX_PATTERN = 1024
MAX_REGEX = 256
# Memory of one compiled regular expression (RE2's max_mem: its program and
# its DFA cache). Enough for any pattern of MAX_REGEX characters that makes
# sense on names; larger programs are refused as "too large".
REGEX_MEMORY = 1 << 20
# A regex scan of many records pauses after this many characters of names
# (see Selection.picking): a few milliseconds at RE2's slowest.
SCAN_SLICE = 16_384

Limits = collections.namedtuple("Limits", "names patterns")
DEFAULT_LIMITS = Limits(MAX_NAMES, MAX_PATTERNS)


class Budget:
    """What one request may still name: every part of it (VM names, ranges,
    clusters, the regex, LNM names) draws on the same budget."""

    def __init__(self, limits=DEFAULT_LIMITS):
        self.limits = limits
        self.names = 0
        self.patterns = 0

    def take_names(self, count):
        if self.names + count > self.limits.names:
            raise InvalidRequest(
                f"too many names in one request: at most {self.limits.names}, counting "
                "every name a range expands to (ask for fewer, or name a cluster)")
        self.names += count

    def take_pattern(self):
        if self.patterns + 1 > self.limits.patterns:
            raise InvalidRequest(f"too many ranges and regular expressions in one request: "
                                 f"at most {self.limits.patterns}")
        self.patterns += 1


def _parse(pattern):
    """-> (parts, count, longest): the literal strings and range groups of
    ``pattern`` (a group: a list of (low, high, width) or (text,)), how many
    names it expands to and the length of the longest, without making one."""
    if not isinstance(pattern, str):
        raise InvalidRequest("names must be strings")
    if len(pattern) > MAX_PATTERN:
        raise InvalidRequest(f"name or range too long (at most {MAX_PATTERN} characters)")
    parts, count, longest, start = [], 1, 0, 0
    while True:
        opening, closing = pattern.find("[", start), pattern.find("]", start)
        if opening < 0 or closing < opening:
            if opening >= 0 or closing >= 0:
                raise InvalidRequest(f"unbalanced bracket in {_shown(pattern)}")
            parts.append(pattern[start:])
            return parts, count, longest + len(pattern) - start
        closing = pattern.find("]", opening)
        inner = pattern[opening + 1:closing]
        if closing < 0 or "[" in inner:
            raise InvalidRequest(f"unbalanced bracket in {_shown(pattern)}")
        group, size, widest = _group(inner, pattern)
        parts.extend((pattern[start:opening], group))
        count *= size
        longest += opening - start + widest
        start = closing + 1


def _group(inner, pattern):
    group, size, widest = [], 0, 0
    for part in inner.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not _number(lo) or (dash and not _number(hi)):
            shown = inner if len(inner) <= 40 else inner[:40] + "…"
            raise InvalidRequest(f"malformed range [{shown}] in {_shown(pattern)}")
        if not dash:
            group.append((lo,))
            size += 1
            widest = max(widest, len(lo))
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise InvalidRequest(f"empty range {part} in {_shown(pattern)}")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        group.append((a, b, width))
        size += b - a + 1
        widest = max(widest, width, len(hi.lstrip("0")) or 1)
    return group, size, widest


def _shown(text):
    """``text`` quoted for a message, at most 64 characters of it."""
    return repr(text) if len(text) <= 64 else repr(text[:64]) + "…"


def _number(text):
    return text.isascii() and text.isdigit()


def _values(group):
    for item in group:
        if len(item) == 1:
            yield item[0]
        else:
            a, b, width = item
            yield from (str(i).zfill(width) for i in range(a, b + 1))


def expand_ranges(pattern, budget=None):
    """Expand every ``[a-b,c]`` group in pattern; -> list of names. The names
    are counted against ``budget`` (a fresh default one if None) before any
    is made; a pattern with a range also counts as a pattern."""
    budget = Budget() if budget is None else budget
    parts, count, longest = _parse(pattern)
    if len(parts) > 1:
        budget.take_pattern()
    budget.take_names(count)
    if longest > MAX_NAME:
        raise InvalidRequest(f"{_shown(pattern)} makes names longer than {MAX_NAME} characters")
    if len(parts) == 1:
        return [pattern]
    # Each group has at most ``count`` values: what is materialised here is
    # bounded by the budget just taken.
    literals, groups = parts[0::2], [list(_values(g)) for g in parts[1::2]]
    names = []
    for values in itertools.product(*groups):
        names.append("".join(itertools.chain.from_iterable(
            itertools.zip_longest(literals, values, fillvalue=""))))
    return names


def _regex_options():
    options = re2.Options()
    options.max_mem = REGEX_MEMORY
    options.log_errors = False      # RE2 would print the pattern on stderr
    options.never_capture = True    # only "does it match" is ever asked
    return options


_OPTIONS = _regex_options()
# RE2's module-level compile keeps the last 128 patterns (and their DFA
# memory) in a cache; a pattern from a peer is compiled afresh and dropped
# with its selection.
_compile = getattr(re2, "_Regexp", None) or re2.compile


def compile_regex(text):
    """A user's regular expression compiled with RE2 -> its regex object;
    anything that is not a short RE2 pattern raises InvalidRequest."""
    if not isinstance(text, str):
        raise InvalidRequest("a regular expression must be a string")
    if len(text) > MAX_REGEX:
        raise InvalidRequest(f"regular expression too long (at most {MAX_REGEX} characters)")
    try:
        return _compile(text, _OPTIONS)
    except re2.error as e:
        raise InvalidRequest(_regex_error(text, e)) from None
    except UnicodeError:                 # a lone surrogate, which UTF-8 cannot hold
        raise InvalidRequest(f"malformed regular expression {text!r}: not valid Unicode"
                             ) from None


def _regex_error(text, error):
    reason = error.args[0] if error.args else ""
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    reason = str(reason)[:200]
    if any(f"perl operator: {op}" in reason for op in ("(?=", "(?!", "(?<=", "(?<!")):
        why = "lookahead and lookbehind are not supported"
    elif any(f"\\{d}" in reason for d in "123456789"):
        why = "backreferences are not supported"
    elif "too large" in reason:
        why = "the pattern is too large (fewer or smaller repetitions)"
    else:
        why = f"{reason} (RE2 syntax)"
    return f"malformed regular expression {text!r}: {why}"


def _strings(items, what):
    if not isinstance(items, (list, tuple)):
        raise InvalidRequest(f"{what} must be a list")
    return items


class Selection:
    """A set of VMs described by names/ranges, a regex and/or clusters,
    optionally only those on some LNMs.

    The parts combine as a union; an empty selection selects nothing unless
    ``everything`` is set. ``lnms`` (LNM names, ranges, ``/regex/`` or
    ``~regex``) filters the union to the VMs on those LNMs, or alone selects
    every VM on them. ``limits`` (or a shared ``budget``) bound the whole
    selection: names (ranges expanded, clusters and LNM names included) and
    patterns (ranges and regular expressions).
    """

    def __init__(self, names=(), regex=None, clusters=(), everything=False, *,
                 lnms=(), limits=DEFAULT_LIMITS, budget=None):
        budget = Budget(limits) if budget is None else budget
        # The LNMs the VMs must be on (names, ranges, /regex/ or ~regex, as
        # match_names): a filter on the rest, or alone every VM on them.
        self.lnms = []
        self._lnm_names, self._lnm_regexes = set(), []
        for pattern in _strings(lnms, "selection lnms"):
            if not isinstance(pattern, str):
                raise InvalidRequest("LNM names must be strings")
            lnm_regex = _lnm_regex(pattern)
            if lnm_regex is not None:
                budget.take_pattern()
                self._lnm_regexes.append(compile_regex(lnm_regex))
            else:
                self._lnm_names.update(expand_ranges(pattern, budget))
            self.lnms.append(pattern)
        self.names = []
        for pattern in names:
            self.names.extend(expand_ranges(pattern, budget))
        self.clusters = []
        for cluster in clusters:
            if not isinstance(cluster, str) or len(cluster) > MAX_NAME:
                raise InvalidRequest("cluster names must be short strings")
            budget.take_names(1)
            self.clusters.append(cluster)
        if regex is not None:
            budget.take_pattern()
        self.regex = compile_regex(regex) if regex is not None else None
        self.everything = bool(everything)

    def __bool__(self):
        return bool(self.names or self.regex is not None or self.clusters or self.everything
                    or self.lnms)

    @property
    def lnms_only(self):
        """Only LNMs were given: every VM on them."""
        return bool(self.lnms) and not (self.names or self.regex is not None
                                        or self.clusters or self.everything)

    def on_lnms(self, lnm):
        """Is a VM on ``lnm`` kept by the selection's LNM filter (always
        true without one)?"""
        if not self.lnms:
            return True
        if not isinstance(lnm, str):
            return False
        return lnm in self._lnm_names or any(r.search(lnm) for r in self._lnm_regexes)

    def matching_lnms(self, candidates):
        """The names among ``candidates`` (known LNMs) the LNM filter keeps;
        an explicit name that is not a candidate is NoSuchLNM."""
        unknown = sorted(self._lnm_names - set(candidates))
        if unknown:
            raise NoSuchLNM(f"no such LNM: {', '.join(unknown[:5])}")
        return [c for c in candidates if self.on_lnms(c)]

    def to_wire(self):
        wire = {"names": list(self.names),
                "regex": self.regex.pattern if self.regex is not None else None,
                "clusters": list(self.clusters),
                "everything": self.everything}
        if self.lnms:      # (only then: a controller before issue 15 knows no "lnms")
            wire["lnms"] = list(self.lnms)
        return wire

    @classmethod
    def from_wire(cls, data, limits=DEFAULT_LIMITS, budget=None):
        if data is None:
            return cls(everything=True, limits=limits, budget=budget)
        if isinstance(data, (list, tuple)):
            return cls(names=data, limits=limits, budget=budget)
        if not isinstance(data, dict):
            raise InvalidRequest("a VM selection is a list of names or a dict")
        unknown = set(data) - {"names", "regex", "clusters", "everything", "lnms"}
        if unknown:
            raise InvalidRequest("unknown selection keys: "
                                 + ", ".join(sorted(repr(k)[:40] for k in unknown)[:5]))
        names = _strings(data.get("names") or [], "selection names")
        clusters = _strings(data.get("clusters") or [], "selection clusters")
        everything = data.get("everything")
        if everything is not None and not isinstance(everything, (bool, int)):
            raise InvalidRequest("selection 'everything' must be true or false")
        lnms = _strings(data.get("lnms") or [], "selection lnms")
        return cls(names=names, regex=data.get("regex"), clusters=clusters,
                   everything=bool(everything), lnms=lnms, limits=limits, budget=budget)

    def picking(self, records, qualify, slice_chars=SCAN_SLICE):
        """``pick`` as a generator: it yields (None) each time a regular
        expression has scanned ``slice_chars`` characters of names, so that
        the caller may let other work run (and drop what was removed
        meanwhile), and returns what ``pick`` returns."""
        every = self.everything or self.lnms_only
        if every and not self.names and not self.lnms:
            # Every record of ``records``, as it is: no name is seen twice in
            # a mapping, and no LNM filter applies.
            return list(records.values()), []
        chosen, unknown, seen = [], [], set()

        def take(rec):
            if rec["name"] not in seen and self.on_lnms(rec.get("lnm")):
                seen.add(rec["name"])
                chosen.append(rec)

        for name in self.names:
            full = qualify(name)
            rec = records.get(full)
            if rec is None:
                unknown.append(full)
            else:
                take(rec)
        if self.regex is not None or self.clusters or every:
            clusters, scanned = set(self.clusters), 0
            for rec in list(records.values()):
                if every or rec.get("cluster") in clusters:
                    take(rec)
                elif self.regex is not None:
                    scanned += len(rec["name"])
                    if self.regex.search(rec["name"]):
                        take(rec)
                    if scanned >= slice_chars:
                        scanned = 0
                        yield
        return chosen, unknown

    def pick(self, records, qualify):
        """Split into (selected records, unknown names) against ``records``,
        a dict name -> record; ``qualify`` maps a requested name to a full name.
        """
        steps = self.picking(records, qualify)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value


def _lnm_regex(pattern):
    """The regular expression of an LNM pattern (``/re/`` or ``~re``), or
    None for a name or range."""
    if pattern.startswith("~"):
        return pattern[1:]
    if len(pattern) > 1 and pattern[0] == pattern[-1] == "/":
        return pattern[1:-1]
    return None


def match_names(candidates, patterns, budget=None):
    """Select LNM names by explicit names or regexes (``/re/`` or ``~re``).

    Returns the matched names, pattern by pattern, each pattern's in
    candidate order; raises for an explicit name that is not a candidate.
    Names and patterns count against ``budget`` (a fresh default one if None).
    """
    budget = Budget() if budget is None else budget
    patterns = _strings(patterns, "LNM patterns")
    chosen, taken = [], set()
    known = set(candidates)

    def take(name):
        if name not in taken:
            taken.add(name)
            chosen.append(name)

    for pattern in patterns:
        if not isinstance(pattern, str):
            raise InvalidRequest("LNM names must be strings")
        text = _lnm_regex(pattern)
        if text is not None:
            budget.take_pattern()
            regex = compile_regex(text)
            for candidate in candidates:
                if candidate not in taken and regex.search(candidate):
                    take(candidate)
        else:
            for name in expand_ranges(pattern, budget):
                if name not in known:
                    raise NoSuchLNM(f"no such LNM: {name}")
                take(name)
    return chosen

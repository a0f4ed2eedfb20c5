"""Selecting sets of VMs and LNMs: explicit names, ranges, regular
expressions and whole virtual clusters.

Ranges use brackets, as in pdsh and Slurm: ``[1-3,7].sneetch`` is
``1.sneetch 2.sneetch 3.sneetch 7.sneetch``; ``web[01-03]`` keeps the zero
padding. A regular expression is searched in the full VM name.
"""

import re

from usher.errors import InvalidRequest

RANGE_RE = re.compile(r"\[([^\[\]]*)\]")
MAX_EXPANSION = 100_000
MAX_REGEX = 1000


def expand_ranges(pattern):
    """Expand every ``[a-b,c]`` group in pattern; -> list of names."""
    match = RANGE_RE.search(pattern)
    if not match:
        if "[" in pattern or "]" in pattern:
            raise InvalidRequest(f"unbalanced bracket in {pattern!r}")
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    values = []
    for part in match.group(1).split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise InvalidRequest(f"malformed range [{match.group(1)}] in {pattern!r}")
        if not dash:
            values.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise InvalidRequest(f"empty range {part} in {pattern!r}")
        if b - a + 1 > MAX_EXPANSION:
            raise InvalidRequest(f"range {part} is too large")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        values.extend(str(i).zfill(width) for i in range(a, b + 1))
    names = []
    for value in values:
        for rest in expand_ranges(tail):
            names.append(head + value + rest)
            if len(names) > MAX_EXPANSION:
                raise InvalidRequest(f"{pattern!r} expands to too many names")
    return names


def compile_regex(text):
    if not isinstance(text, str) or len(text) > MAX_REGEX:
        raise InvalidRequest("regular expression missing or too long")
    try:
        return re.compile(text)
    except re.error as e:
        raise InvalidRequest(f"malformed regular expression {text!r}: {e}") from None


class Selection:
    """A set of VMs described by names/ranges, a regex and/or clusters.

    The parts combine as a union; an empty selection selects nothing unless
    ``everything`` is set.
    """

    def __init__(self, names=(), regex=None, clusters=(), everything=False):
        self.names = []
        for pattern in names:
            if not isinstance(pattern, str):
                raise InvalidRequest("VM names must be strings")
            self.names.extend(expand_ranges(pattern))
        self.regex = compile_regex(regex) if regex is not None else None
        self.clusters = list(clusters)
        self.everything = everything

    def __bool__(self):
        return bool(self.names or self.regex or self.clusters or self.everything)

    def to_wire(self):
        return {"names": list(self.names),
                "regex": self.regex.pattern if self.regex else None,
                "clusters": list(self.clusters),
                "everything": self.everything}

    @classmethod
    def from_wire(cls, data):
        if data is None:
            return cls(everything=True)
        if isinstance(data, (list, tuple)):
            return cls(names=data)
        if not isinstance(data, dict):
            raise InvalidRequest("a VM selection is a list of names or a dict")
        unknown = set(data) - {"names", "regex", "clusters", "everything"}
        if unknown:
            raise InvalidRequest(f"unknown selection keys: {', '.join(sorted(unknown))}")
        names = data.get("names") or []
        clusters = data.get("clusters") or []
        if not isinstance(names, (list, tuple)) or not isinstance(clusters, (list, tuple)):
            raise InvalidRequest("selection names and clusters must be lists")
        return cls(names=names, regex=data.get("regex"), clusters=clusters,
                   everything=bool(data.get("everything")))

    def pick(self, records, qualify):
        """Split into (selected records, unknown names) against ``records``,
        a dict name -> record; ``qualify`` maps a requested name to a full name.
        """
        chosen, unknown, seen = [], [], set()

        def take(rec):
            if rec["name"] not in seen:
                seen.add(rec["name"])
                chosen.append(rec)

        for name in self.names:
            full = qualify(name)
            rec = records.get(full)
            if rec is None:
                unknown.append(full)
            else:
                take(rec)
        if self.regex or self.clusters or self.everything:
            clusters = set(self.clusters)
            for rec in records.values():
                if (self.everything or rec.get("cluster") in clusters
                        or (self.regex and self.regex.search(rec["name"]))):
                    take(rec)
        return chosen, unknown


def match_names(candidates, patterns):
    """Select LNM names by explicit names or regexes (``/re/`` or ``~re``).

    Returns the matched names in candidate order; raises for an explicit name
    that is not a candidate.
    """
    chosen = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise InvalidRequest("LNM names must be strings")
        if pattern.startswith("~") or (len(pattern) > 1 and pattern[0] == pattern[-1] == "/"):
            regex = compile_regex(pattern[1:-1] if pattern.startswith("/") else pattern[1:])
            chosen.extend(c for c in candidates if regex.search(c) and c not in chosen)
        else:
            for name in expand_ranges(pattern):
                if name not in candidates:
                    raise InvalidRequest(f"no such LNM: {name}")
                if name not in chosen:
                    chosen.append(name)
    return chosen

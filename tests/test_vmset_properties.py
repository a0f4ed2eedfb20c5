"""Property-based tests of the selection parser (usher.vmset): whatever a
peer sends, a selection is bounded by its limits, and anything malformed is
an InvalidRequest, nothing else."""

import math
import tracemalloc

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from usher.errors import InvalidRequest, NoSuchLNM
from usher.vmset import (MAX_REGEX, Budget, Limits, Selection, compile_regex, expand_ranges,
                         match_names)

SMALL = Limits(names=50, patterns=3)
PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# What jelly can carry, nested: text, numbers (huge ones too), lists, dicts.
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10 ** 30)
           | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=10))
wire = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                    | st.dictionaries(st.text(max_size=10) | st.integers(), inner, max_size=6),
                    max_leaves=30)
# Text made mostly of what ranges are made of, so that many are well formed.
range_text = st.text(alphabet="0123456789[]-,.ab x", max_size=40)
selection_dicts = st.fixed_dictionaries({}, optional={
    "names": st.lists(range_text | wire, max_size=8) | wire,
    "regex": st.none() | st.text(max_size=40) | wire,
    "clusters": st.lists(st.text(max_size=20) | wire, max_size=8) | wire,
    "everything": wire,
})


def counted(budget):
    assert budget.names <= budget.limits.names
    assert budget.patterns <= budget.limits.patterns


@PROPERTY
@given(st.text(max_size=60) | range_text)
@example("[1-100000].x")
@example("[0-99999999999999999999999999999999]")
@example("[²]")
@example("[1-3]" * 30)
def test_expand_ranges_is_bounded_or_invalid(pattern):
    budget = Budget(SMALL)
    try:
        names = expand_ranges(pattern, budget)
    except InvalidRequest:
        counted(budget)
        return
    counted(budget)
    assert len(names) == budget.names <= SMALL.names
    assert all(isinstance(n, str) and "[" not in n and "]" not in n for n in names)


@PROPERTY
@given(selection_dicts | wire)
@example({"names": ["[1-100000].x"] * 20})
@example({"names": ["[1-2].x"] * 10})
@example({"regex": "([a-z]+)+!", "names": [[["deep"]]]})
@example({"clusters": [10 ** 40], "everything": "yes"})
def test_from_wire_is_bounded_or_invalid(data):
    budget = Budget(SMALL)
    try:
        selection = Selection.from_wire(data, budget=budget)
    except InvalidRequest:
        counted(budget)
        return
    counted(budget)
    assert len(selection.names) + len(selection.clusters) <= SMALL.names
    assert all(isinstance(n, str) for n in selection.names + selection.clusters)
    again = Selection.from_wire(selection.to_wire(), limits=SMALL)
    assert again.to_wire() == selection.to_wire()


@PROPERTY
@given(prefix=st.from_regex(r"[a-z]{0,5}\.?", fullmatch=True),
       suffix=st.from_regex(r"\.?[a-z]{0,5}", fullmatch=True),
       lo=st.integers(0, 5000), span=st.integers(0, 40), width=st.integers(0, 6))
def test_a_padded_range_round_trips(prefix, suffix, lo, span, width):
    hi = lo + span
    lo_text, hi_text = str(lo).zfill(width), str(hi).zfill(width)
    pad = len(lo_text) if lo_text.startswith("0") and len(lo_text) > 1 else 0
    expected = [f"{prefix}{str(i).zfill(pad)}{suffix}" for i in range(lo, hi + 1)]
    pattern = f"{prefix}[{lo_text}-{hi_text}]{suffix}"
    assert expand_ranges(pattern) == expected
    selection = Selection(names=[pattern])
    assert Selection.from_wire(selection.to_wire()).names == expected


@PROPERTY
@given(st.lists(st.lists(st.integers(1, 12), min_size=1, max_size=3), min_size=1, max_size=4))
def test_groups_multiply_and_the_budget_counts_them_first(groups):
    pattern = ".".join("[" + ",".join(str(v) for v in group) + "]" for group in groups)
    count = math.prod(len(group) for group in groups)
    budget = Budget(Limits(names=100, patterns=10))
    if count > 100:
        with pytest.raises(InvalidRequest, match="too many names"):
            expand_ranges(pattern, budget)
        assert budget.names == 0
    else:
        names = expand_ranges(pattern, budget)
        assert len(names) == count == budget.names and budget.patterns == 1


@pytest.mark.parametrize("pattern", ["[1-100000000000].x", "[1-100000].[1-100000]",
                                     "x[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]"])
def test_an_oversized_range_is_refused_before_anything_is_allocated(pattern):
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest, match="too many names"):
            expand_ranges(pattern)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@PROPERTY
@given(st.text(max_size=MAX_REGEX + 20))
@example("([a-z]+)+!")
@example(r"(a)\1")
@example("(?=x)")
@example("(?<!x)y")
@example("\ud800")
@example("[\\p{L}]{1000}")
@example("a{1001}")
def test_any_text_compiles_in_re2_or_is_invalid(text):
    try:
        regex = compile_regex(text)
    except InvalidRequest as e:
        assert str(e)
        return
    assert len(text) <= MAX_REGEX and regex.pattern == text
    found = regex.search("1.sneetch.alice.usher.test")
    assert found is None or 0 <= found.start() <= found.end() <= 26


@PROPERTY
@given(st.lists(st.text(max_size=12) | st.sampled_from(["~vmm", "/^x/", "vmm[1-3]", "~("]),
                max_size=6))
def test_match_names_picks_candidates_or_is_invalid(patterns):
    candidates = ["vmm1", "vmm2", "vmm3", "x1"]
    budget = Budget(SMALL)
    try:
        chosen = match_names(candidates, patterns, budget)
    except (InvalidRequest, NoSuchLNM):
        counted(budget)
        return
    counted(budget)
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(candidates)


@PROPERTY
@given(st.sets(st.integers(1, 200), max_size=60),
       st.text(alphabet="0123456789.^$|*+[]()", max_size=12))
def test_pick_agrees_with_a_plain_scan(present, regex):
    records = {f"{i}.web": {"name": f"{i}.web", "cluster": "web" if i % 2 else "db",
                            "state": "run"} for i in present}
    try:
        selection = Selection(regex=regex, clusters=["db"])
    except InvalidRequest:
        return
    assume(selection.regex is not None)
    chosen, unknown = selection.pick(records, lambda n: n)
    expected = {name for name, rec in records.items()
                if rec["cluster"] == "db" or selection.regex.search(name)}
    assert {r["name"] for r in chosen} == expected and unknown == []
    # Paused every few characters, the scan picks the same.
    steps = selection.picking(records, lambda n: n, slice_chars=8)
    pauses = 0
    while True:
        try:
            next(steps)
            pauses += 1
        except StopIteration as done:
            assert [r["name"] for r in done.value[0]] == [r["name"] for r in chosen]
            break
    # Each pause comes after at least 8 characters and at most 8 and a name.
    scanned = [len(n) for n, r in records.items() if r["cluster"] != "db"]
    assert sum(scanned) // (8 + max(scanned, default=0)) <= pauses <= sum(scanned) // 8

"""The wire encoding of records (usher.records): what a hostile peer may send
is refused with InvalidRequest, never another exception."""

import gc
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usher import records as records_module
from usher.errors import InvalidRequest
from usher.records import (CHUNK_BYTES, chunk_texts, decode_chunks, decode_object,
                           decode_records, encode_chunks, encode_object)


def test_chunks_and_objects_round_trip():
    items = [{"name": f"{i}.web.alice.usher.test", "n": i} for i in range(50)]
    chunks = encode_chunks(items, limit=400)
    assert len(chunks) > 1 and all(len(c) <= 400 for c in chunks)
    assert decode_records(chunks) == items
    assert decode_chunks([c.encode() for c in chunks]) == items
    assert decode_object(encode_object({"cpu": [1.0, 2.0, 3.0]})) == {"cpu": [1.0, 2.0, 3.0]}


@pytest.mark.parametrize("chunks, message", [
    ("[]", "list of JSON chunks"),
    ([7], "expected a JSON chunk"),
    (["[1,"], "malformed JSON chunk"),
    ([b"\xff\xfe"], "malformed JSON chunk"),
    (['{"a": 1}'], "holding a JSON list"),
])
def test_hostile_chunks_are_refused(chunks, message):
    with pytest.raises(InvalidRequest, match=message):
        decode_chunks(chunks)


@pytest.mark.parametrize("text, message", [
    (None, "expected a JSON object"),
    ("nope", "malformed JSON object"),
    (b"\xc3", "malformed JSON object"),
    ("[1, 2]", "holding a JSON dict"),
])
def test_hostile_objects_are_refused(text, message):
    with pytest.raises(InvalidRequest, match=message):
        decode_object(text)


def test_records_need_a_string_name():
    with pytest.raises(InvalidRequest, match="malformed VM record"):
        decode_records(encode_chunks([{"name": 7}]))
    with pytest.raises(InvalidRequest, match="too large"):
        encode_object({"x": "y" * 100}, limit=50)


def test_a_record_naming_its_lnm_by_the_old_key_is_read():
    old = encode_chunks([{"name": "a", "vmm": "lnm1"}, {"name": "b", "lnm": "lnm2"}])
    assert decode_records(old) == [{"name": "a", "lnm": "lnm1"},
                                           {"name": "b", "lnm": "lnm2"}]


# -- chunks encoded a run at a time (issue 16) ------------------------------------------

def _one_by_one(items, limit):
    """encode_chunks as it was: each item encoded alone (json.dumps) and
    added to the current chunk, a new one started when the next does not fit."""
    return chunk_texts([json.dumps(item, separators=(",", ":")) for item in items], limit)


_items = st.lists(st.one_of(
    st.fixed_dictionaries({"name": st.text(max_size=40), "n": st.integers(),
                           "args": st.dictionaries(st.text(max_size=8),
                                                   st.text(max_size=300), max_size=3)}),
    st.text(max_size=600), st.floats(allow_nan=True), st.none()), max_size=300)


@settings(max_examples=200, deadline=None)
@given(items=_items, limit=st.integers(min_value=8, max_value=4096))
def test_chunks_are_those_of_adding_items_one_by_one(items, limit):
    # The same chunks, byte for byte, as the one-by-one encoding (peers cap
    # the chunks of a message by how full they are), or the same refusal.
    try:
        expected = _one_by_one(items, limit)
    except InvalidRequest:
        with pytest.raises(InvalidRequest, match="too large"):
            encode_chunks(items, limit=limit)
        return
    assert encode_chunks(items, limit=limit) == expected
    assert all(len(c) <= limit for c in expected)


def test_chunks_of_many_records_are_those_of_adding_them_one_by_one():
    records = [{"name": f"{i}.fill.bench.usher.test", "owner": "bench", "state": "run",
                "lnm": f"fleet{i % 2000:04d}", "args": {"cluster": "fill"} if i % 7 else
                {"note": "x" * (i % 5000)}} for i in range(20_000)]
    assert encode_chunks(records) == _one_by_one(records, CHUNK_BYTES)
    assert encode_chunks(iter(records[:10])) == _one_by_one(records[:10], CHUNK_BYTES)
    assert encode_chunks([]) == []


def test_decoding_pauses_the_collector_and_turns_it_on_again():
    chunks = encode_chunks([{"name": f"{i}.web.alice.usher.test"} for i in range(1000)])
    seen = []
    original = records_module._load

    def load(*args):
        seen.append(gc.isenabled())
        return original(*args)

    records_module._load = load
    try:
        assert gc.isenabled()
        assert len(decode_records(chunks)) == 1000
        assert seen and not any(seen) and gc.isenabled()
        with pytest.raises(InvalidRequest):
            decode_records(chunks + ["[1,"])
        assert gc.isenabled()              # on again after a refusal too
        gc.disable()
        try:
            decode_chunks(chunks)
            assert not gc.isenabled()      # left off if it was off
        finally:
            gc.enable()
    finally:
        records_module._load = original


def test_chunks_of_texts_encoded_one_by_one_are_the_chunks_of_the_items():
    from usher.records import chunk_texts, encode_chunks, encode_item
    items = [{"name": f"{i}.c.u.example.org", "pad": "x" * (i % 700)} for i in range(3000)]
    assert chunk_texts([encode_item(i) for i in items], limit=64 * 1024) == encode_chunks(
        items, limit=64 * 1024)

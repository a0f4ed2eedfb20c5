"""The wire encoding of records (usher.records): what a hostile peer may send
is refused with InvalidRequest, never another exception."""

import pytest

from usher.errors import InvalidRequest
from usher.records import (decode_chunks, decode_object, decode_records, encode_chunks,
                           encode_object)


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

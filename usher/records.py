"""VM records and their wire encoding.

A VM record is a plain dict with the keys of ``VM_FIELDS``. Bulk transfers
(client sync, ``list``, LNM inventories) send records as JSON text chunks,
each well under banana's 640 KiB string limit: jelly-encoding 10,000 dicts
takes seconds, JSON takes milliseconds, and one string per chunk costs PB
almost nothing.
"""

import contextlib
import gc
import json

from usher.errors import InvalidRequest

VM_FIELDS = ("name", "owner", "cluster", "state", "lnm", "memory_mib", "vcpus",
             "uuid", "managed", "version", "args")

# Peers before 2026-12 named a record's LNM "vmm" (the paper's VMM is the
# hypervisor, not the LNM driving it): still read, never sent.
OLD_LNM_KEY = "vmm"

# Leave room under banana.SIZE_LIMIT (640 KiB) for framing and multibyte text.
CHUNK_BYTES = 256 * 1024
MAX_CHUNKS = 4096


# One encoder for every chunk (``json.dumps`` builds a new one per call):
# compact separators, ASCII only, so that a chunk's length in characters is
# its length in bytes.
_encode = json.JSONEncoder(separators=(",", ":")).encode

# Items are encoded a run at a time: the first run's length, and the share
# of a chunk the next runs aim at (from the last run's bytes per item).
_FIRST_RUN = 16
_RUN_SHARE = 1 / 32


def encode_item(item):
    """One JSON-able item as the text encode_chunks would put in a chunk."""
    return _encode(item)


class _Chunks:
    """Chunks being filled: texts added one by one, a new chunk begun when
    the next does not fit (what peers expect: they cap a message's chunks)."""

    __slots__ = ("limit", "chunks", "parts", "size")

    def __init__(self, limit):
        self.limit = limit
        self.chunks, self.parts, self.size = [], [], 2

    def add(self, text):
        if len(text) + 2 > self.limit:
            raise InvalidRequest("record too large to send")
        if self.parts and self.size + len(text) + 1 > self.limit:
            self.chunks.append("[" + ",".join(self.parts) + "]")
            self.parts, self.size = [], 2
        self.parts.append(text)
        self.size += len(text) + 1

    def add_run(self, joined):
        """A JSON array of several items, whole, if it fits in the current
        chunk (as adding its items one by one would) -> whether it did."""
        if self.size + len(joined) - 1 > self.limit:
            return False
        self.parts.append(joined[1:-1])
        self.size += len(joined) - 1
        return True

    def done(self):
        if self.parts:
            self.chunks.append("[" + ",".join(self.parts) + "]")
            self.parts = []
        return self.chunks


def chunk_texts(texts, limit=CHUNK_BYTES):
    """Items already encoded (``encode_item``) -> the chunks encode_chunks
    makes of the items."""
    chunks = _Chunks(limit)
    for text in texts:
        chunks.add(text)
    return chunks.done()


def encode_chunks(items, limit=CHUNK_BYTES):
    """JSON-encode a list of JSON-able items as a list of strings, each a JSON
    array of at most ``limit`` bytes (an item larger than that is refused).

    The chunks are those of adding the items one by one to the current chunk
    and starting a new one when the next does not fit; but items are encoded
    a run at a time (one call of the C encoder for some 1/32 of a chunk, not
    one per item): a run that fits whole joins the chunk, and only a run that
    does not is placed item by item."""
    if not isinstance(items, (list, tuple)):
        items = list(items)
    chunks = _Chunks(limit)
    start, count = 0, _FIRST_RUN
    while start < len(items):
        run = items[start:start + count]
        start += len(run)
        joined = _encode(run)
        if not chunks.add_run(joined):
            for item in run:
                chunks.add(_encode(item))
        per_item = max(1.0, (len(joined) - 1) / len(run))
        count = max(1, min(2 * len(run), int(limit * _RUN_SHARE / per_item)))
    return chunks.done()


def _load(text, what, kind):
    """``text`` (str or UTF-8 bytes) parsed as JSON and checked to be a
    ``kind`` -> it; anything else raises InvalidRequest naming ``what``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(text, str):
            raise InvalidRequest(f"expected a {what}")
        item = json.loads(text)
    except ValueError as e:   # UnicodeDecodeError and JSONDecodeError alike
        raise InvalidRequest(f"malformed {what}: {e}") from None
    except RecursionError:
        raise InvalidRequest(f"malformed {what}: nested too deeply") from None
    if not isinstance(item, kind):
        raise InvalidRequest(f"expected a {what} holding a JSON {kind.__name__}")
    return item


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector paused meanwhile (if it was on).

    Parsing JSON makes nothing but new, acyclic lists and dicts; 50,000
    records are 100,000 of them, and with the collector on, each 700 set
    off a collection of the young ones and, as they pile up, collections of
    the whole heap: close to half the time of decoding a listing of 50,000
    records went there. Once it is on again, the next collection (one) finds
    them. Process-wide, like the collector itself: it is turned on again
    only if it was on when the pause began."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def decode_chunks(chunks):
    """Inverse of encode_chunks, validating the shape (a peer may be hostile)."""
    if not isinstance(chunks, (list, tuple)) or len(chunks) > MAX_CHUNKS:
        raise InvalidRequest("expected a list of JSON chunks")
    items = []
    with collector_paused():
        for chunk in chunks:
            items.extend(_load(chunk, "JSON chunk", list))
    return items


def encode_object(item, limit=CHUNK_BYTES):
    """One JSON object as a string of at most ``limit`` bytes."""
    text = _encode(item)
    if len(text) > limit:
        raise InvalidRequest("object too large to send")
    return text


def decode_object(text):
    """Inverse of encode_object, checking it is a JSON object (a dict)."""
    return _load(text, "JSON object", dict)


def decode_records(chunks):
    """Decode VM records, checking each is a dict with a string name."""
    with collector_paused():
        records = decode_chunks(chunks)
        for rec in records:
            if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
                raise InvalidRequest("malformed VM record")
            if OLD_LNM_KEY in rec:
                old = rec.pop(OLD_LNM_KEY)
                rec.setdefault("lnm", old)
    return records

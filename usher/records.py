"""VM records and their wire encoding.

A VM record is a plain dict with the keys of ``VM_FIELDS``. Bulk transfers
(client sync, ``list``, LNM inventories) send records as JSON text chunks,
each well under banana's 640 KiB string limit: jelly-encoding 10,000 dicts
takes seconds, JSON takes milliseconds, and one string per chunk costs PB
almost nothing.
"""

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


def encode_item(item):
    """One JSON-able item as compact JSON text (what encode_chunks joins)."""
    return json.dumps(item, separators=(",", ":"))


def encode_chunks(items, limit=CHUNK_BYTES):
    """JSON-encode a list of JSON-able items as a list of strings, each a JSON
    array of at most ``limit`` bytes (an item larger than that is refused)."""
    return chunk_texts((encode_item(item) for item in items), limit)


def chunk_texts(texts, limit=CHUNK_BYTES):
    """Items already encoded (encode_item) -> chunks as encode_chunks makes."""
    chunks, current, size = [], [], 2
    for text in texts:
        if len(text) + 2 > limit:
            raise InvalidRequest("record too large to send")
        if current and size + len(text) + 1 > limit:
            chunks.append("[" + ",".join(current) + "]")
            current, size = [], 2
        current.append(text)
        size += len(text) + 1
    if current:
        chunks.append("[" + ",".join(current) + "]")
    return chunks


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


def decode_chunks(chunks):
    """Inverse of encode_chunks, validating the shape (a peer may be hostile)."""
    if not isinstance(chunks, (list, tuple)) or len(chunks) > MAX_CHUNKS:
        raise InvalidRequest("expected a list of JSON chunks")
    items = []
    for chunk in chunks:
        items.extend(_load(chunk, "JSON chunk", list))
    return items


def encode_object(item, limit=CHUNK_BYTES):
    """One JSON object as a string of at most ``limit`` bytes."""
    text = json.dumps(item, separators=(",", ":"))
    if len(text) > limit:
        raise InvalidRequest("object too large to send")
    return text


def decode_object(text):
    """Inverse of encode_object, checking it is a JSON object (a dict)."""
    return _load(text, "JSON object", dict)


def decode_records(chunks):
    """Decode VM records, checking each is a dict with a string name."""
    records = decode_chunks(chunks)
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            raise InvalidRequest("malformed VM record")
        if OLD_LNM_KEY in rec:
            old = rec.pop(OLD_LNM_KEY)
            rec.setdefault("lnm", old)
    return records

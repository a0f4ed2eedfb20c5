"""The LNM's remote API (paper, Table 2): the capability it hands the
controller in ``attach``. See ``usher.protocol`` for the wire contract.

Every remote_* method validates what the peer sent before anything happens
(types, sizes; a peer may be hostile or simply buggy), delegates to the
NodeManager and returns a Deferred. Errors reach the controller as
UsherErrors; anything else is logged here and sent as OperationFailed, so no
internals leak.
"""

import base64
import binascii
import functools

from twisted.logger import Logger
from twisted.spread import pb

from usher import records, states
from usher.errors import InvalidRequest, OperationFailed, UsherError
from usher.lnm.received_xml import MAX_DEFINITION_CHARS
from usher.lnm.terms import TermGate, drop
from usher.pbutil import as_deferred
from usher.protocol import MAX_FIELD

# Raw bytes per image chunk: base64 turns 3 bytes into 4 characters, so a
# chunk is 256 KiB of text, well under banana's 640 KiB string limit.
IMAGE_CHUNK_BYTES = 192 * 1024
# 16 GiB of image text: a memory image is as large as the VM's memory.
MAX_IMAGE_CHUNKS = 65536
# A domain definition travels as one string: under banana's limit.
MAX_XML = MAX_DEFINITION_CHARS
# VMs in one start_many (the controller sends a few dozen at a time).
MAX_START_MANY = 1024

log = Logger()


def encode_image(data):
    """bytes -> list of base64 text chunks, each under banana's limit."""
    return [base64.b64encode(data[i:i + IMAGE_CHUNK_BYTES]).decode("ascii")
            for i in range(0, len(data), IMAGE_CHUNK_BYTES)]


def decode_image(chunks, max_bytes=None):
    """Inverse of encode_image, refusing anything malformed or (before
    decoding it) decoding to more than ``max_bytes``."""
    if not isinstance(chunks, (list, tuple)) or len(chunks) > MAX_IMAGE_CHUNKS:
        raise InvalidRequest("image must be a list of at most "
                             f"{MAX_IMAGE_CHUNKS} base64 chunks")
    if not all(isinstance(chunk, (str, bytes)) and len(chunk) <= 2 * IMAGE_CHUNK_BYTES
               for chunk in chunks):
        raise InvalidRequest("image chunk must be base64 text of at most "
                             f"{2 * IMAGE_CHUNK_BYTES} characters")
    encoded = sum(len(chunk) for chunk in chunks)
    if max_bytes is not None and encoded // 4 * 3 > max_bytes:
        raise InvalidRequest(f"the image (about {encoded // 4 * 3} bytes) is larger than "
                             f"this LNM accepts for the VM ({max_bytes} bytes: the memory "
                             "of its record here and import_overhead_mib)")
    parts = []
    for chunk in chunks:
        if isinstance(chunk, str):
            chunk = chunk.encode("ascii", "replace")
        try:
            parts.append(base64.b64decode(chunk, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidRequest("image chunk is not valid base64") from None
    return b"".join(parts)


def encode_export(exported):
    """A VMM's export ({"xml", "image": bytes or None, "state"}) -> the wire
    form, the image as base64 chunks."""
    image = exported.get("image")
    return {"xml": exported["xml"], "state": exported.get("state"),
            "image": None if image is None else encode_image(image)}


def decode_export(payload, max_image_bytes=None):
    """Inverse of encode_export, refusing anything malformed or an image of
    more than ``max_image_bytes``."""
    if not isinstance(payload, dict):
        raise InvalidRequest("image payload must be a dict")
    xml = payload.get("xml")
    if not isinstance(xml, str) or not xml or len(xml) > MAX_XML:
        raise InvalidRequest(f"image payload needs the domain definition (xml, at most "
                             f"{MAX_XML} characters)")
    state = payload.get("state")
    if state is not None and state not in states.ALL_STATES:
        raise InvalidRequest(f"image payload has an unknown state {str(state)[:80]!r}")
    image = payload.get("image")
    return {"xml": xml, "state": state or states.RUN,
            "image": None if image is None else decode_image(image, max_image_bytes)}


def check_name(name, what="VM name"):
    if not isinstance(name, str):
        raise InvalidRequest(f"{what} must be a string, not {type(name).__name__}")
    if not name or len(name) > MAX_FIELD or not name.isprintable():
        raise InvalidRequest(f"invalid {what} {name[:80]!r}")
    return name


def _remote(method):
    """An ``async def remote_x``: -> Deferred; non-Usher errors logged and
    replaced by OperationFailed."""

    @functools.wraps(method)
    async def guarded(self, *args):
        try:
            return await method(self, *args)
        except UsherError:
            raise
        except Exception:
            log.failure("LNM {lnm}: {method} failed", lnm=self.manager.name,
                        method=method.__name__)
            raise OperationFailed(
                f"{method.__name__.removeprefix('remote_')}: internal error on LNM "
                f"{self.manager.name} (see its log)") from None

    return as_deferred(guarded)


class NodeAPI(pb.Referenceable):
    """The remote face of a NodeManager.

    Every remote call passes the term gate first (``usher.lnm.terms``; the
    one place it is checked): ``controller_term`` sets the connection's
    term; any other command on a connection whose term is below the highest
    seen is refused with StaleTerm and the connection dropped."""

    def __init__(self, manager, terms=None):
        self.manager = manager
        self.terms = terms if terms is not None else TermGate(lnm_name=manager.name)

    def remoteMessageReceived(self, broker, message, args, kw):
        name = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        if name == "controller_term":
            args, kw = broker.unserialize(args), broker.unserialize(kw)
            d = self._controller_term(broker, *args, **kw)
            return d.addCallback(lambda state: broker.serialize(state, self.perspective))
        if self.terms.is_stale(broker):
            raise self.terms.refuse(broker, str(name)[:80], self.manager.clock)
        return super().remoteMessageReceived(broker, message, args, kw)

    @as_deferred
    async def _controller_term(self, broker, claim=None, *extra, **kwextra):
        if extra or kwextra or not isinstance(claim, dict) or set(claim) != {"term",
                                                                              "controller"}:
            raise InvalidRequest('controller_term takes one dict: {"term": int, '
                                 '"controller": str}')
        answer = await self.terms.offer(broker, claim["term"], claim["controller"])
        if not answer["accepted"]:
            drop(broker, self.manager.clock)
        return answer

    @_remote
    async def remote_ping(self):
        return True

    @_remote
    async def remote_get_node_info(self):
        return await self.manager.get_node_info()

    @_remote
    async def remote_get_node_status(self):
        return await self.manager.get_node_status()

    @_remote
    async def remote_list_vms(self):
        return records.encode_chunks(await self.manager.list_vms())

    @_remote
    async def remote_get_details(self, name):
        return await self.manager.get_details(check_name(name))

    @_remote
    async def remote_get_status(self, name):
        return await self.manager.get_status(check_name(name))

    @_remote
    async def remote_receive(self, chunks):
        return await self.manager.receive(records.decode_records(chunks))

    @_remote
    async def remote_start(self, name):
        return await self.manager.start(check_name(name))

    @_remote
    async def remote_start_many(self, names):
        if not isinstance(names, (list, tuple)) or len(names) > MAX_START_MANY:
            raise InvalidRequest(f"start_many needs a list of at most {MAX_START_MANY} "
                                 "VM names")
        names = [check_name(name) for name in names]
        if len(set(names)) != len(names):
            raise InvalidRequest("start_many: the same VM appears twice")
        results = await self.manager.start_many(names)
        return records.encode_chunks([
            {"name": name, "error": str(outcome), "kind": outcome.__class__.__name__}
            if isinstance(outcome, Exception) else {"name": name, "info": outcome}
            for name, outcome in results])

    @_remote
    async def remote_op_on(self, operation, name):
        if not isinstance(operation, str) or operation not in states.OPERATIONS:
            raise InvalidRequest(f"unknown operation {str(operation)[:80]!r}; expected one "
                                 "of " + ", ".join(states.OPERATIONS))
        return await self.manager.op_on(operation, check_name(name))

    @_remote
    async def remote_migrate(self, name, target):
        check_name(name)
        if not isinstance(target, dict):
            raise InvalidRequest("migration target must be a dict")
        uri = target.get("migration_uri")
        if not isinstance(uri, str) or not uri or len(uri) > MAX_FIELD:
            raise InvalidRequest("migration target needs a migration_uri string")
        await self.manager.migrate(name, {"migration_uri": uri})
        return None

    @_remote
    async def remote_export_image(self, name):
        exported = await self.manager.export_image(check_name(name))
        return encode_export(exported)

    @_remote
    async def remote_import_image(self, name, payload):
        check_name(name)
        limit = self.manager.import_limit(name)    # the record came first (receive)
        return await self.manager.import_image(name, decode_export(payload, limit))

    @_remote
    async def remote_release_export(self, name):
        return await self.manager.release_export(check_name(name))

    @_remote
    async def remote_restore_export(self, name):
        return await self.manager.restore_export(check_name(name))

"""The controller's PB boundary towards LNMs (mutual TLS).

An LNM proves who it is with its certificate; its name is the certificate's
common name, never what it claims. On ``attach`` it hands over a reference
to its node API (paper, Table 2), which the controller wraps as a
``RemoteLNM`` handle, and receives a ``NodeReporter`` for its event reports.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb
from twisted.spread.flavors import IPBRoot
from zope.interface import implementer

from usher import pki
from usher.errors import (InvalidRequest, LinkFailure, PermissionDenied, UsherError,
                          from_name)
from usher.liveness import ping_peer
from usher.pbutil import as_deferred, call
from usher.protocol import PROTOCOL_VERSION
from usher.records import decode_object, decode_records, encode_chunks

log = Logger()


class RemoteLNM:
    """A handle on one LNM's node API; every call has a timeout."""

    def __init__(self, ref, broker, *, clock, call_timeout, command_timeout):
        self.ref = ref
        self.broker = broker
        self.clock = clock
        self.call_timeout = call_timeout
        self.command_timeout = command_timeout

    def _call(self, method, *args, timeout=None):
        return call(self.ref, method, *args, clock=self.clock,
                    timeout=timeout or self.call_timeout)

    async def get_node_info(self):
        info = await self._call("get_node_info")
        if not isinstance(info, dict):
            raise InvalidRequest("LNM sent malformed node information")
        return info

    async def get_node_status(self):
        return await self._call("get_node_status")

    async def list_vms(self):
        return decode_records(await self._call("list_vms"))

    async def get_details(self, name):
        return await self._call("get_details", name)

    async def get_status(self, name):
        return await self._call("get_status", name)

    async def receive(self, records):
        return await self._call("receive", encode_chunks(records))

    async def start(self, name):
        return await self._call("start", name, timeout=self.command_timeout) or {}

    async def start_many(self, names):
        """-> [(name, domain info or UsherError)], the LNM's answer per VM."""
        names = list(names)
        reply = await self._call("start_many", names, timeout=self.command_timeout)
        outcomes = []
        try:
            for entry in decode_records(reply):
                if "error" in entry:
                    outcomes.append((entry["name"], from_name(entry.get("kind"),
                                                              entry["error"])))
                elif isinstance(entry.get("info"), dict):
                    outcomes.append((entry["name"], entry["info"]))
                else:
                    raise InvalidRequest("an entry has neither info nor error")
            if [name for name, _outcome in outcomes] != names:
                raise InvalidRequest("it does not answer for the VMs asked, in order")
        except InvalidRequest as e:
            # The VMs may have started: their outcome is unknown.
            raise LinkFailure(f"start_many: malformed answer from the LNM ({e})") from None
        return outcomes

    async def op_on(self, operation, name):
        return await self._call("op_on", operation, name, timeout=self.command_timeout)

    async def migrate(self, name, target):
        return await self._call("migrate", name, target, timeout=self.command_timeout)

    async def export_image(self, name):
        return await self._call("export_image", name, timeout=self.command_timeout)

    async def import_image(self, name, payload):
        return await self._call("import_image", name, payload,
                                timeout=self.command_timeout)

    async def release_export(self, name):
        return await self._call("release_export", name)

    async def restore_export(self, name):
        return await self._call("restore_export", name, timeout=self.command_timeout)

    def ping(self):
        return ping_peer(self.broker, lambda: self._call("ping"), clock=self.clock,
                         timeout=self.call_timeout)

    def disconnect(self):
        transport = getattr(self.broker, "transport", None)
        if transport is not None:
            transport.loseConnection()

    def abort(self):
        """Drop the connection at once: over a cut link a TLS goodbye would
        wait forever for its bytes to leave."""
        transport = getattr(self.broker, "transport", None)
        if transport is not None:
            transport.abortConnection()


class NodeReporter(pb.Referenceable):
    """The capability an LNM gets back: where it reports what it observes."""

    def __init__(self, controller, name):
        self.controller = controller
        self.name = name

    def remote_report(self, chunks):
        try:
            changes = decode_records(chunks)
            acks = self.controller.lnm_report(self.name, changes)
            return defer.succeed(encode_chunks(acks))
        except UsherError as e:
            return defer.fail(e)

    def remote_report_status(self, node, chunks):
        """The LNM's monitoring figures (usher.protocol, Monitoring)."""
        try:
            vms = decode_records(chunks)
            self.controller.lnm_status_report(self.name, decode_object(node), vms)
            return defer.succeed(True)
        except UsherError as e:
            log.warn("LNM {lnm}: status report refused: {error}", lnm=self.name, error=e)
            return defer.fail(e)

    def remote_ping(self):
        return defer.succeed(True)


class LNMGateway(pb.Referenceable):
    """The root object one LNM connection sees."""

    def __init__(self, controller, broker, *, clock, call_timeout, command_timeout):
        self.controller = controller
        self.broker = broker
        self.clock = clock
        self.call_timeout = call_timeout
        self.command_timeout = command_timeout
        self.attached = None

    @as_deferred
    async def remote_attach(self, node_api, hello=None):
        name = pki.peer_common_name(self.broker.transport)
        if not name:
            raise PermissionDenied("no client certificate")
        if self.attached is not None:
            raise InvalidRequest("already attached on this connection")
        if not isinstance(node_api, pb.RemoteReference):
            raise InvalidRequest("attach needs a reference to the node API")
        hello = hello if isinstance(hello, dict) else {}
        if hello.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise InvalidRequest(f"protocol {hello.get('protocol')!r} not supported")
        peer = self.broker.transport.getPeer()
        hello = {"protocol": PROTOCOL_VERSION,
                 "recovery_port": hello.get("recovery_port")
                 if isinstance(hello.get("recovery_port"), int) else None,
                 "recovery_host": getattr(peer, "host", None)}
        handle = RemoteLNM(node_api, self.broker, clock=self.clock,
                           call_timeout=self.call_timeout,
                           command_timeout=self.command_timeout)
        self.attached = name
        self.broker.notifyOnDisconnect(lambda: self.controller.detach_lnm(name, handle))
        await self.controller.attach_lnm(name, handle, hello)
        return NodeReporter(self.controller, name)


@implementer(IPBRoot)
class LNMRoot:
    """Gives each LNM connection its own gateway (it needs the connection's
    certificate)."""

    def __init__(self, controller, *, clock, call_timeout, command_timeout):
        self.controller = controller
        self.clock = clock
        self.call_timeout = call_timeout
        self.command_timeout = command_timeout

    def rootObject(self, broker):
        return LNMGateway(self.controller, broker, clock=self.clock,
                          call_timeout=self.call_timeout,
                          command_timeout=self.command_timeout)

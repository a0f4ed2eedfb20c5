"""The controller's PB boundary towards LNMs (mutual TLS).

An LNM proves who it is with its certificate; its name is the certificate's
common name, never what it claims. On ``attach`` it hands over a reference
to its node API (paper, Table 2), which the controller wraps as a
``RemoteLNM`` handle, and receives a ``NodeReporter`` for its event reports.

An LNM host may be compromised: whatever it sends (hello, node information,
inventory, reports, answers to commands) is checked here by
``usher.controller.lnm_input`` before the controller sees it.
"""

import functools
import weakref

from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb
from twisted.spread.flavors import IPBRoot
from zope.interface import implementer

from usher import pki
from usher.controller import lnm_input
from usher.errors import (InvalidRequest, LinkFailure, OperationFailed, PermissionDenied,
                          Standby,
                          UsherError, from_name)
from usher.interfaces import ILNMHandle
from usher.liveness import ping_peer
from usher.pbutil import as_deferred, call
from usher.protocol import PROTOCOL_VERSION
from usher.records import decode_object, encode_chunks

log = Logger()


@implementer(ILNMHandle)
class RemoteLNM:
    """A handle on one LNM's node API; every call has a timeout."""

    def __init__(self, ref, broker, *, clock, call_timeout, command_timeout, domain,
                 limits=None):
        self.ref = ref
        self.broker = broker
        self.clock = clock
        self.call_timeout = call_timeout
        self.command_timeout = command_timeout
        self.domain = domain
        self.limits = limits or lnm_input.LNMLimits()

    def _call(self, method, *args, timeout=None):
        return call(self.ref, method, *args, clock=self.clock,
                    timeout=timeout or self.call_timeout)

    async def get_node_info(self):
        try:
            return lnm_input.check_node_info(await self._call("get_node_info"))
        except InvalidRequest as e:
            raise InvalidRequest(f"LNM sent malformed node information: {e}") from None

    async def get_node_status(self):
        return await self._call("get_node_status")

    async def list_vms(self):
        return lnm_input.check_inventory(await self._call("list_vms"), self.domain,
                                         self.limits)

    async def get_details(self, name):
        return lnm_input.check_domain_info(await self._call("get_details", name), name)

    async def get_status(self, name):
        return await self._call("get_status", name)

    async def receive(self, records):
        return await self._call("receive", encode_chunks(records))

    async def start(self, name):
        info = await self._call("start", name, timeout=self.command_timeout)
        return lnm_input.check_domain_info(info, name, optional=True) or {}

    async def start_many(self, names):
        """-> [(name, domain info or UsherError)], the LNM's answer per VM."""
        names = list(names)
        reply = await self._call("start_many", names, timeout=self.command_timeout)
        outcomes = []
        try:
            for entry in lnm_input.decode_bounded(reply, self.limits.bulk_chunks,
                                                  "the answer to start_many"):
                name, outcome = lnm_input.check_start_outcome(entry)
                if isinstance(outcome, tuple):
                    outcome = from_name(*outcome)
                outcomes.append((name, outcome))
            if [name for name, _outcome in outcomes] != names:
                raise InvalidRequest("it does not answer for the VMs asked, in order")
        except InvalidRequest as e:
            # The VMs may have started: their outcome is unknown.
            raise LinkFailure(f"start_many: malformed answer from the LNM ({e})") from None
        return outcomes

    async def op_on(self, operation, name):
        info = await self._call("op_on", operation, name, timeout=self.command_timeout)
        return lnm_input.check_domain_info(info, name, optional=True)

    async def migrate(self, name, target):
        return await self._call("migrate", name, target, timeout=self.command_timeout)

    async def export_image(self, name):
        return await self._call("export_image", name, timeout=self.command_timeout)

    async def import_image(self, name, payload):
        info = await self._call("import_image", name, payload,
                                timeout=self.command_timeout)
        return lnm_input.check_domain_info(info, name)

    async def release_export(self, name):
        return await self._call("release_export", name)

    async def restore_export(self, name):
        info = await self._call("restore_export", name, timeout=self.command_timeout)
        return lnm_input.check_domain_info(info, name, optional=True)

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


def _reporting(method):
    """A ``NodeReporter.remote_*`` method -> one that returns a Deferred:
    UsherErrors reach the LNM as they are; any other error is logged here
    with its traceback and reaches it as OperationFailed, so no internals
    leak (as the LNM's own remote entry points do, usher.lnm.api)."""

    @functools.wraps(method)
    def guarded(self, *args):
        try:
            return defer.succeed(method(self, *args))
        except UsherError as e:
            return defer.fail(e)
        except Exception:
            log.failure("LNM {lnm}: {method} failed", lnm=self.name, method=method.__name__)
            return defer.fail(OperationFailed(
                f"{method.__name__.removeprefix('remote_')}: internal error on the "
                "controller (see its log)"))

    return guarded


class NodeReporter(pb.Referenceable):
    """The capability an LNM gets back: where it reports what it observes."""

    def __init__(self, controller, name):
        self.controller = controller
        self.name = name

    @_reporting
    def remote_report(self, chunks):
        controller = self.controller
        try:
            changes = lnm_input.check_report(chunks, controller.domain,
                                             controller.lnm_limits)
        except InvalidRequest as e:
            controller.lnm_refused(self.name, "report", e)
            raise
        return encode_chunks(controller.lnm_report(self.name, changes))

    @_reporting
    def remote_report_status(self, node, chunks, kept=None):
        """The LNM's monitoring figures (usher.protocol, Monitoring and
        report_status): ``kept`` (JSON chunks of names) from an LNM that
        sends deltas, None from an older one -> {"resend": [names]}."""
        limits = self.controller.lnm_limits
        try:
            vms = lnm_input.check_status_size(chunks, limits)
            kept = lnm_input.check_status_kept(kept, limits, len(vms))
            resend = self.controller.lnm_status_report(self.name, decode_object(node), vms,
                                                       kept)
        except InvalidRequest as e:
            self.controller.lnm_refused(self.name, "status report", e)
            raise
        return {"resend": resend}

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
        hello = lnm_input.check_hello(hello, PROTOCOL_VERSION)
        peer = self.broker.transport.getPeer()
        hello["recovery_host"] = getattr(peer, "host", None)
        handle = RemoteLNM(node_api, self.broker, clock=self.clock,
                           call_timeout=self.call_timeout,
                           command_timeout=self.command_timeout,
                           domain=self.controller.domain,
                           limits=self.controller.lnm_limits)
        self.attached = name
        # The term of leadership first (usher.protocol, "Controller terms"):
        # an LNM that has seen a newer one refuses this controller.
        await self._tell_term(name, node_api)
        self.broker.notifyOnDisconnect(lambda: self.controller.detach_lnm(name, handle))
        await self.controller.attach_lnm(name, handle, hello)
        return NodeReporter(self.controller, name)

    async def _tell_term(self, name, node_api):
        term = int(getattr(self.controller, "term", 0) or 0)
        ha = bool(getattr(self.controller, "ha", False))
        try:
            d = node_api.callRemote("controller_term", {
                "term": term, "controller": getattr(self.controller, "ha_name", None) or ""})
        except pb.DeadReferenceError:
            raise LinkFailure("controller_term: peer disconnected", sent=False) from None
        d.addTimeout(self.call_timeout, self.clock)
        failed = []
        d.addErrback(failed.append)
        answer = await d
        if failed:
            failure = failed[0]
            kind = failure.type
            if isinstance(kind, bytes):
                kind = kind.decode("utf-8", "replace")
            if not isinstance(kind, str):
                kind = getattr(kind, "__name__", str(kind))
            e = failure.getErrorMessage()
            if kind.endswith("NoSuchMethod") and not ha:
                return                        # an older LNM: term 0, one controller
            self.broker.transport.loseConnection()
            if kind.endswith("NoSuchMethod"):
                log.warn("LNM {lnm} knows no controller terms: refused (a standby "
                         "controller needs LNMs that do)", lnm=name)
                raise InvalidRequest("this controller is one of a standby pair: the LNM "
                                     "must support controller terms") from None
            raise LinkFailure(f"controller_term: {e}") from None
        accepted = isinstance(answer, dict) and answer.get("accepted") is True
        if not accepted:
            highest = answer.get("highest") if isinstance(answer, dict) else None
            log.warn("LNM {lnm} refused term {term} (it has seen {highest}): link dropped",
                     lnm=name, term=term, highest=str(highest)[:20])
            self.broker.transport.loseConnection()
            raise Standby(f"the LNM has seen a newer term than {term}")


class StandbyGateway(pb.Referenceable):
    """What an LNM connection sees on a standby controller: attach answers
    ``Standby``."""

    def __init__(self, message):
        self.message = message

    def remote_attach(self, node_api, hello=None):
        return defer.fail(Standby(self.message))


@implementer(IPBRoot)
class HALNMRoot:
    """The LNM port of one of a standby pair: ``controller`` is the active
    term's controller, None on a standby (``standby_message()`` then says
    who is active). ``drop_all()`` cuts every LNM connection (stepping
    down)."""

    def __init__(self, *, clock, call_timeout, command_timeout, standby_message):
        self.controller = None
        self.clock = clock
        self.call_timeout = call_timeout
        self.command_timeout = command_timeout
        self.standby_message = standby_message
        self.brokers = weakref.WeakSet()

    def rootObject(self, broker):
        if self.controller is None:
            return StandbyGateway(self.standby_message())
        self.brokers.add(broker)
        return LNMGateway(self.controller, broker, clock=self.clock,
                          call_timeout=self.call_timeout,
                          command_timeout=self.command_timeout)

    def drop_all(self):
        self.brokers = abort_all(self.brokers)


def abort_all(brokers):
    """Cut every connection of ``brokers`` -> an empty WeakSet."""
    for broker in list(brokers):
        transport = getattr(broker, "transport", None)
        if transport is not None:
            transport.abortConnection()
    return weakref.WeakSet()


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

"""plusher's XML-RPC boundary: the down-calls Plush makes, each checked
for its argument count and with every error turned into a fault, over a
``Gateway``; and the HTTP requests it accepts (bodies of bounded size)."""

import functools
import inspect

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server, xmlrpc

from usher.clients.plusher.wire import (FAULT_INTERNAL, FAULT_INVALID_REQUEST, fault_code,
                                        strip_none)
from usher.errors import UsherError

log = Logger()


def _to_fault(failure, method):
    error = failure.value
    if isinstance(error, xmlrpc.Fault):
        return error
    if isinstance(error, UsherError):
        return xmlrpc.Fault(fault_code(error), str(error))
    log.failure("plusher: {method} failed", failure, method=method)
    return xmlrpc.Fault(FAULT_INTERNAL, f"internal error in plusher ({method}); "
                        "see its log")


def _client_host(request):
    address = request.getClientAddress()
    return getattr(address, "host", None)


def _boundary(name, procedure):
    """Check the argument count, run, and turn every error into a Fault. A
    procedure with a keyword-only ``source`` is given the HTTP peer's address
    (for the controller's login back-off)."""
    signature = inspect.signature(procedure)
    positional = [p for p in signature.parameters.values() if p.kind is not p.KEYWORD_ONLY]
    params = ", ".join(p.name if p.default is p.empty else f"[{p.name}]"
                       for p in positional)
    takes_source = "source" in signature.parameters

    @functools.wraps(procedure)
    def call(request, *args):
        source = {"source": _client_host(request)} if takes_source else {}
        try:
            signature.bind(*args, **source)
        except TypeError:
            return xmlrpc.Fault(FAULT_INVALID_REQUEST,
                                f"{name}({params}): got {len(args)} argument"
                                f"{'' if len(args) == 1 else 's'}")
        d = defer.maybeDeferred(procedure, *args, **source)
        d.addCallback(strip_none)
        d.addErrback(_to_fault, name)
        return d
    call.withRequest = True
    return call


class PlusherResource(xmlrpc.XMLRPC):
    """The XML-RPC methods Plush calls (the down-calls), over a Gateway."""

    def __init__(self, gateway):
        super().__init__(allowNone=False)
        self.gateway = gateway
        xmlrpc.addIntrospection(self)

    def lookupProcedure(self, procedurePath):
        procedure = super().lookupProcedure(procedurePath)
        if self.separator in procedurePath:
            return procedure          # system.* introspection
        return _boundary(procedurePath, procedure)

    def xmlrpc_login(self, user, password, *, source=None):
        """login(user, password) -> session id. The controller checks the
        credentials; the session holds one connection to it, closed after
        session_idle_timeout seconds without calls."""
        return self.gateway.login(user, password, source=source)
    xmlrpc_login.signature = [["string", "string", "string"]]

    def xmlrpc_logout(self, session):
        """logout(session) -> true. Requests of the session still waiting for
        their VMs keep its connection until they end."""
        return self.gateway.logout(session)
    xmlrpc_logout.signature = [["boolean", "string"]]

    def xmlrpc_request_vms(self, session, cluster, count, options, callback_url, *,
                           source=None):
        """request_vms(session, cluster, count, options, callback_url) -> request
        id, at once. Starts count VMs in the virtual cluster; options (a
        struct) become the start request's arguments (memory_mib, vcpus, os
        ...; "lnms": array of suggested hosts). When every VM runs plusher
        calls resources_ready(request id, [hosts]) at callback_url (http or
        https, on a host callback_hosts allows; an empty callback_url: no
        up-call, poll status); if some cannot start, resources_failed(request
        id, message, [hosts that did start])."""
        return self.gateway.request_vms(session, cluster, count, options, callback_url,
                                        source=source)
    xmlrpc_request_vms.signature = [["string", "string", "string", "int", "struct",
                                     "string"]]

    def xmlrpc_release(self, session, target, *, source=None):
        """release(session, request id | [VM names]) -> {released: [names],
        failed: [{name, error}], notes}. Deletes the VMs (powered off first if
        they run); no up-call follows
        the release of a request."""
        return self.gateway.release(session, target, source=source)
    xmlrpc_release.signature = [["struct", "string", "string"], ["struct", "string", "array"]]

    def xmlrpc_status(self, session, request_id, *, source=None):
        """status(session, request id) -> {request_id, state (starting, waiting,
        ready, failed, released), cluster, count, vms: [{name, state, ...}],
        hosts, failed: [{name, error}], notes, message, upcall (none, pending,
        delivered, refused, gave_up, cancelled)}."""
        return self.gateway.status(session, request_id, source=source)
    xmlrpc_status.signature = [["struct", "string", "string"]]

    def xmlrpc_list_vms(self, session, cluster=None, *, source=None):
        """list_vms(session[, cluster]) -> [{name, state, lnm, cluster,
        memory_mib, vcpus, address}]: the user's VMs (of one cluster)."""
        return self.gateway.list_vms(session, cluster, source=source)
    xmlrpc_list_vms.signature = [["array", "string"], ["array", "string", "string"]]

    def xmlrpc_operate(self, session, operation, target, *, source=None):
        """operate(session, operation, request id | [VM names]) -> {operation,
        done: [{name, state}], failed: [{name, error}], notes}. Operations:
        pause, resume, shutdown, reboot, hibernate, restore, destroy (a hard
        power-off; the VM is kept), cycle, delete (of VMs that are off)."""
        return self.gateway.operate(session, operation, target, source=source)
    xmlrpc_operate.signature = [["struct", "string", "string", "string"],
                                ["struct", "string", "string", "array"]]


class BoundedRequest(server.Request):
    """A request whose body may be at most ``max_body`` bytes: a larger
    Content-Length is answered 413 before any of the body is read, and a
    chunked body that grows past it is cut off there with a 413; nothing of
    either is parsed."""

    max_body = 1024 * 1024
    _body = 0
    _refused = False

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self._too_large(length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._body += len(data)
        if self._body > self.max_body:
            self._too_large(self._body)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if not self._refused:
            super().requestReceived(command, path, version)

    def _too_large(self, size):
        self._refused = True
        self.content = None
        self.requestHeaders.removeHeader(b"expect")     # no "100 Continue" after this
        log.warn("refused a request of {size} bytes or more from {peer} (at most {limit}: "
                 "max_request_bytes)", size=size, peer=_client_host(self),
                 limit=self.max_body)
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
        transport.loseConnection()


def make_site(gateway):
    site = server.Site(PlusherResource(gateway))
    site.requestFactory = type("PlusherRequest", (BoundedRequest,),
                               {"max_body": gateway.settings.max_request_bytes})
    site.noisy = False
    return site


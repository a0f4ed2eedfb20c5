"""The Usher client library: asynchronous, event-based, mirroring the
controller's API (paper, Table 4).

    client = UsherClient(reactor, "ctrl.example.org", 7390, ca_file=...,
                         username="alice", password="...")
    await client.connect()
    client.on_change(lambda changed, removed: ...)
    await client.start(cluster="sneetch", count=10)
    await client.pause(Selection(clusters=["sneetch"]))

Every public method returns a Deferred. The client keeps a cache of the
user's VMs (optionally only some clusters), kept current by the controller's
change notifications, and checks requests against it before sending them.
If the controller goes away the client reconnects with exponential backoff,
flushes its cache and receives a fresh one; callbacks keep working.

``host`` may list several controllers (high availability: a list, or a
comma-separated string, of ``host[:port]``; ``port`` is the default port;
``tls_name`` one name for all or one per entry): the client tries each in
turn, on connect and on every reconnection; a standby's ``Standby`` refusal
or a failed connection moves to the next one, and the backoff applies after
a full round. Connecting fails once a whole round failed.
"""


from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.spread import pb

from usher import pki
from usher.controllers import Rotation, parse_controllers
from usher.errors import (ConfigError, InvalidRequest, LinkFailure, NoSuchVM,
                          PermissionDenied, Standby, Unavailable, UsherError, from_failure)
from usher.liveness import enable_tcp_keepalive
from usher.naming import check_label, check_short_name, qualify, split
from usher.pbutil import as_deferred, call
from usher.records import decode_chunks, decode_records, encode_object
from usher.states import OPERATIONS, OPERATION_PRECONDITIONS, RUN, SHUTOFF
from usher.vmset import Selection

log = Logger()

__all__ = ["UsherClient", "Selection"]

# TCP keepalive on the connection to the controller: probes after this many
# idle seconds, and the connection is dropped (then redialled) after that
# many seconds without an answer.
KEEPALIVE_INTERVAL = 10.0
KEEPALIVE_TIMEOUT = 30.0


def _reason(link_failure):
    text = str(link_failure)
    if "no answer" in text:
        return "the controller did not answer in time"
    return "the connection to the controller was lost"


class _Observer(pb.Referenceable):
    """The callback object the controller pushes VM changes to."""

    def __init__(self, client):
        self.client = client

    def remote_vm_changes(self, seq, chunks, removed):
        self.client._apply_changes(seq, chunks, removed)

    def remote_notice(self, kind, message):
        self.client._fire_connection("notice", f"{kind}: {message}")


class _Broker(pb.Broker):
    """Tells the client why its connection was lost: a controller refused in
    the TLS handshake (usher.pki: wrong role, wrong name, unknown CA) ends
    the first connection attempt at once, with that reason."""

    def connectionLost(self, reason):
        self.factory.client._connection_lost(reason, self)
        super().connectionLost(reason)


class _LoginFactory(pb.PBClientFactory):
    """Logs in again on every new connection (buildbot's pattern: logging in
    from ClientService's prepareConnection can wedge the service)."""

    protocol = _Broker

    def __init__(self, client):
        super().__init__()
        self.client = client

    def clientConnectionMade(self, broker):
        super().clientConnectionMade(broker)
        # A controller whose host vanished sends no FIN: let TCP notice it
        # (idle clients make no calls whose timeouts would).
        enable_tcp_keepalive(broker.transport, interval=KEEPALIVE_INTERVAL,
                             timeout=KEEPALIVE_TIMEOUT)
        d = defer.Deferred.fromCoroutine(self.client._login(self._root, broker))
        d.addErrback(lambda f: self.client._login_failed(f, broker))


class UsherClient:
    def __init__(self, reactor, host, port, *, ca_file, tls_name=None, username,
                 password, clusters=None, timeout=60.0, initial_delay=1.0, max_delay=30.0,
                 cert_file=None, key_file=None, source=None):
        self.reactor = reactor
        try:
            self.controllers = parse_controllers(host, port, tls_name, where="the client")
            self._config_error = None
        except ConfigError as e:
            self.controllers, self._config_error = [], e
        self._rotation = None
        self._logged_in_broker = None
        self._single_host, self._single_port = host, port
        self.ca_file = ca_file
        self._tls_name = tls_name
        # A gateway's certificate (role gateway; plusher's gateway_cert_file),
        # presented to the controller, which then trusts it as a gateway.
        self.cert_file = cert_file
        self.key_file = key_file
        self.username = username
        self._password = password
        # A gateway (plusher) logs in on behalf of a user at this address;
        # the controller counts it only from a gateway's certificate.
        self.source = source
        self.clusters = list(clusters) if clusters else None
        self.timeout = timeout
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.user = None
        self.domain = None
        self.admin = False
        self.vms = {}
        self._perspective = None
        self._seq = 0
        self._service = None
        self._first_login = None
        self._change_callbacks = []
        self._connection_callbacks = []
        self._observer = _Observer(self)

    # -- connection ----------------------------------------------------------

    @property
    def _controller(self):
        if self._rotation is not None:
            return self._rotation.dialed or self._rotation.current
        return self.controllers[0] if self.controllers else None

    @property
    def host(self):
        """The controller dialed last (the first configured before that)."""
        controller = self._controller
        return controller.host if controller is not None else self._single_host

    @property
    def port(self):
        controller = self._controller
        return controller.port if controller is not None else self._single_port

    @property
    def tls_name(self):
        controller = self._controller
        return controller.tls_name if controller is not None else self._tls_name

    def _tls_options(self, tls_name):
        # Only a certificate of role controller: the password goes nowhere
        # else (an LNM's or a gateway's key cannot pose as the controller).
        return pki.client_tls_options(tls_name, self.ca_file, self.cert_file,
                                      self.key_file, peer_role=pki.ROLE_CONTROLLER,
                                      role=pki.ROLE_GATEWAY, link="usher client")

    def _endpoint(self, controller, tls):
        return wrapClientTLS(tls, TCP4ClientEndpoint(self.reactor, controller.host,
                                                     controller.port,
                                                     timeout=min(self.timeout, 30)))

    def _round_failed(self, errors):
        """A whole round of controllers failed: the first connect fails."""
        first = self._first_login
        if first is None or first.called:
            return
        shown = "; ".join(f"{label}: {error}" for label, error in errors.items())
        if errors and all(error.startswith("standby") for error in errors.values()):
            first.errback(Standby(f"every controller is a standby ({shown})"))
        else:
            first.errback(Unavailable(f"cannot reach an active controller: {shown}"))

    @property
    def connected(self):
        return self._perspective is not None

    @property
    def seq(self):
        """The number of the last change notification applied to the cache."""
        return self._seq

    def connect(self):
        """Contact and authenticate with the controller over TLS; -> Deferred
        firing {"user", "admin", "domain"}."""
        if self._service is not None:
            return defer.fail(InvalidRequest("already connected; use reconnect()"))
        if self._config_error is not None:
            return defer.fail(self._config_error)
        try:
            tls = {controller: self._tls_options(controller.tls_name)
                   for controller in self.controllers}
        except UsherError as e:
            return defer.fail(e)
        policy = backoffPolicy(initialDelay=self.initial_delay, maxDelay=self.max_delay)
        if len(self.controllers) == 1:
            self._rotation = None
            endpoint = self._endpoint(self.controllers[0], tls[self.controllers[0]])
        else:
            self._rotation = Rotation(
                self.controllers, lambda controller: self._endpoint(controller,
                                                                    tls[controller]),
                base_policy=policy, on_round_failed=self._round_failed)
            endpoint, policy = self._rotation.endpoint, self._rotation.policy
        self._service = ClientService(endpoint, _LoginFactory(self), clock=self.reactor,
                                      retryPolicy=policy)
        self._first_login = defer.Deferred()
        self._service.startService()
        first = self._first_login
        if self._rotation is None:
            attempt = self._service.whenConnected(failAfterFailures=1)

            def cannot_connect(failure):
                if not first.called:
                    first.errback(Unavailable(
                        f"cannot reach the controller at {self.host}:{self.port}: "
                        f"{failure.getErrorMessage()}"))
            attempt.addErrback(cannot_connect)
        first.addTimeout(self.timeout, self.reactor)

        def failed(failure):
            service, self._service = self._service, None
            if service is not None:
                # Not from inside whenConnected's own failure: a reactor turn later.
                self.reactor.callLater(0, service.stopService)
            if failure.check(defer.TimeoutError):
                raise Unavailable(f"no answer from {self.host}:{self.port} "
                                  f"within {self.timeout:g} s")
            return failure
        return first.addErrback(failed)

    def reconnect(self):
        """Disconnect and connect again with the same credentials."""
        d = self.disconnect()
        d.addCallback(lambda _: self.connect())
        return d

    def disconnect(self):
        service, self._service = self._service, None
        self._perspective = None
        if service is None:
            return defer.succeed(None)
        return defer.maybeDeferred(service.stopService)

    async def _login(self, root, broker):
        try:
            claim = {"source": self.source} if self.source is not None else {}
            perspective = await call(root, "login", self.username, self._password,
                                     self._observer, timeout=self.timeout, clock=self.reactor,
                                     **claim)
            who = await call(perspective, "whoami", timeout=self.timeout, clock=self.reactor)
            snapshot = await call(perspective, "subscribe", self.clusters,
                                  timeout=self.timeout, clock=self.reactor)
        except pb.DeadReferenceError:
            return
        if self._rotation is not None:
            self._rotation.succeeded()
        self._logged_in_broker = broker
        self.user, self.admin, self.domain = who["user"], who["admin"], who["domain"]
        records = decode_records(snapshot["chunks"])
        old = self.vms
        self.vms = {r["name"]: r for r in records}
        self._seq = snapshot["seq"]
        self._perspective = perspective
        broker.notifyOnDisconnect(lambda: self._lost(perspective))
        if old:
            removed = sorted(set(old) - set(self.vms))
            self._fire_changes(list(self.vms.values()), removed)
        if self._first_login is not None and not self._first_login.called:
            self._first_login.callback(who)
        else:
            self._fire_connection("connected", f"reconnected to {self.host}:{self.port}")

    def _connection_lost(self, reason, broker=None):
        tls_refused = reason.check(pki.CertificateRefused, VerificationError,
                                   SSL.Error) is not None
        if self._rotation is not None and broker is not None:
            # Several controllers: a connection that worked -> the next one
            # at once; one that never logged in -> the next, and a full round
            # of those fails the first connect.
            if broker is self._logged_in_broker:
                self._logged_in_broker = None
                self._rotation.lost()
            else:
                refused = getattr(broker, "usher_refused", None)
                self._rotation.failed(refused or (
                    f"TLS refused: {reason.getErrorMessage()}" if tls_refused
                    else "the connection dropped before logging in"))
            if tls_refused:
                log.error("cannot reach the controller at {controller}: TLS refused: "
                          "{error}", controller=self._rotation.dialed.label,
                          error=reason.getErrorMessage())
            return
        if not tls_refused:
            return
        error = Unavailable(f"cannot reach the controller at {self.host}:{self.port}: "
                            f"TLS refused: {reason.getErrorMessage()}")
        if self._first_login is not None and not self._first_login.called:
            self._first_login.errback(error)
        else:
            log.error("{error}", error=error)

    def _login_failed(self, failure, broker):
        error = from_failure(failure)
        if self._rotation is not None and isinstance(error, (Standby, Unavailable)):
            # A standby (or a controller that went away meanwhile): the
            # next one (the rotation notes it when the connection drops).
            broker.usher_refused = (f"standby: {error}" if isinstance(error, Standby)
                                    else str(error))
            log.info("the controller at {controller} refused the login: {error}; trying "
                     "the next one", controller=self._rotation.dialed.label, error=error)
            broker.transport.loseConnection()
            return
        if self._first_login is not None and not self._first_login.called:
            self._first_login.errback(error)
        else:
            log.error("login to the controller failed: {error}", error=error)
            self._fire_connection("disconnected", f"login failed: {error}")
        broker.transport.loseConnection()

    def _lost(self, perspective):
        if self._perspective is perspective:
            self._perspective = None
            if self._service is not None:
                self._fire_connection("reconnecting",
                                      f"lost the controller at {self.host}:{self.port}; "
                                      "reconnecting")

    # -- callbacks -----------------------------------------------------------

    def on_change(self, callback):
        """callback(changed records, removed names) on every change to a
        cached VM; returns a function that removes the callback."""
        self._change_callbacks.append(callback)
        return lambda: self._change_callbacks.remove(callback)

    def on_connection(self, callback):
        """callback(state, detail) with state "connected", "disconnected",
        "reconnecting" or "notice"."""
        self._connection_callbacks.append(callback)
        return lambda: self._connection_callbacks.remove(callback)

    def _fire_changes(self, changed, removed):
        for callback in list(self._change_callbacks):
            try:
                callback(changed, removed)
            except Exception:
                log.failure("VM change callback failed")

    def _fire_connection(self, state, detail):
        for callback in list(self._connection_callbacks):
            try:
                callback(state, detail)
            except Exception:
                log.failure("connection callback failed")

    def _apply_changes(self, seq, chunks, removed):
        if seq != self._seq + 1:
            log.warn("missed VM updates ({got} after {had}); resynchronising",
                     got=seq, had=self._seq)
            self._resync()
            return
        self._seq = seq
        changed = decode_records(chunks)
        for rec in changed:
            self.vms[rec["name"]] = rec
        gone = [name for name in removed if self.vms.pop(name, None) is not None]
        self._fire_changes(changed, gone)

    @as_deferred
    async def _resync(self):
        snapshot = await self._remote("subscribe", self.clusters)
        old = self.vms
        self.vms = {r["name"]: r for r in decode_records(snapshot["chunks"])}
        self._seq = snapshot["seq"]
        self._fire_changes(list(self.vms.values()), sorted(set(old) - set(self.vms)))

    async def _remote(self, method, *args):
        if self._perspective is None:
            raise Unavailable("not connected to the controller"
                              + ("; reconnecting" if self._service is not None else ""))
        try:
            return await call(self._perspective, method, *args, timeout=self.timeout,
                              clock=self.reactor)
        except LinkFailure as e:
            if not e.sent:
                raise LinkFailure(f"{method}: not connected to the controller; the request "
                                  "was not sent", sent=False) from None
            # Never silence: the request may or may not have been carried out.
            raise LinkFailure(f"{method}: {_reason(e)} while the request was in progress; "
                              "its outcome is unknown: check with list once reconnected"
                              ) from None

    # -- selections ----------------------------------------------------------

    def _qualify(self, name):
        if self.admin and isinstance(name, str):
            # Administrators name other users' VMs in full; the controller
            # checks them (the cache holds only the administrator's own).
            full = name.strip().lower().rstrip(".")
            parts = split(full, self.domain)
            if parts is not None and parts[1] != self.user:
                return full
        return qualify(name, self.user, self.domain)

    def _foreign(self, name):
        parts = split(name, self.domain)
        return parts is not None and parts[1] != self.user

    def select(self, selection, lnms=None):
        """Resolve a selection against the cache -> list of records; unknown
        or foreign VMs raise before anything is sent. ``lnms`` (LNM names,
        ranges, /regex/ or ~regex) keeps only the VMs on those LNMs."""
        selection = _with_lnms(selection, lnms)
        if self.user is None:
            raise Unavailable("not connected to the controller")
        chosen, unknown = selection.pick(self.vms, self._qualify)
        checkable = [n for n in unknown if not self._foreign(n)]
        if checkable and self.clusters is None:
            raise NoSuchVM(f"no such VM: {', '.join(checkable[:5])}")
        return chosen + [{"name": n} for n in unknown]

    # -- Table 4 -------------------------------------------------------------

    @as_deferred
    async def list(self, selection=None, status=False, remote=False):
        """List VMs: from the cache (no remote call, like ush's ``list``), or
        from the controller with ``remote`` or ``status``: every VM this user
        may see (their own, unless the site's user_visibility is "all";
        administrators see all; other users' records come without args)."""
        if isinstance(selection, (list, tuple)):
            selection = Selection(names=list(selection))
        # By LNM: the controller knows the LNMs (an unknown one is an error).
        if not remote and not status and not (selection is not None and selection.lnms):
            return sorted((dict(r) for r in self.select(selection) if "state" in r),
                          key=lambda r: r["name"])
        wire = selection.to_wire() if selection is not None else None
        return decode_records(await self._remote("list", wire, bool(status)))

    @as_deferred
    async def list_lnm(self, patterns=(), status=False):
        return await self._remote("list_lnm", list(patterns), bool(status))

    @as_deferred
    async def top(self, patterns=(), count=10):
        """Hosts and their busiest VMs: -> {"lnms": [LNM with "status"],
        "vms": [VM record with "status"]}, the VMs by 1-minute CPU average,
        busiest first (usher.protocol, Monitoring)."""
        reply = await self._remote("top", list(patterns), int(count))
        return {"lnms": reply["lnms"], "vms": decode_records(reply["vms"])}

    @as_deferred
    async def start(self, names=(), cluster=None, count=None, lnms=(), args=None):
        args = dict(args or {})
        if cluster is not None:
            args["cluster"] = check_label(cluster, "cluster name")
        if count is not None:
            if not isinstance(count, int) or count < 1:
                raise InvalidRequest("count must be a positive integer")
            if cluster is None:
                raise InvalidRequest("a count needs a cluster name")
            args["count"] = count
        names = list(names)
        for name in names:
            if "[" not in name:
                full = self._qualify(name)
                check_short_name(full.split(".", 1)[0])
                existing = self.vms.get(full)
                # A running one is started already (the controller says so).
                if existing is not None and existing["state"] not in (SHUTOFF, RUN):
                    raise InvalidRequest(f"{full} already exists ({existing['state']})")
        return await self._remote("start", names, list(lnms), args)

    @as_deferred
    async def op_on(self, operation, selection, args=None):
        if operation not in OPERATIONS:
            raise InvalidRequest(f"unknown operation {operation!r}; valid: "
                                 + ", ".join(OPERATIONS))
        return await self._remote("op_on", operation, self._wire_selection(selection), args)

    @as_deferred
    async def migrate(self, selection, lnms=(), args=None):
        return await self._remote("migrate", self._wire_selection(selection, check_owner=False),
                                  list(lnms), args)

    def _wire_selection(self, selection, check_owner=True):
        """What op_on and migrate send: the names the cache resolves, or, for
        a selection by LNM, the selection itself (the controller knows the
        LNMs and where each VM is now)."""
        if isinstance(selection, Selection) and selection.lnms:
            return selection.to_wire()
        records = self.select(selection)
        if not records:
            raise NoSuchVM("no VM matches")
        if check_owner:
            for rec in records:
                if rec.get("owner") not in (None, self.user) and not self.admin:
                    raise PermissionDenied(f"not your VM: {rec['name']}")
        return {"names": [r["name"] for r in records]}

    @as_deferred
    async def query(self, name, /, **args):
        """Ask a plugin's query: -> the list it answers, e.g.
        ``await client.query("ipam.ranges")``, or (administrators)
        ``await client.query("ipam.addresses", owner="bob")``. The arguments
        go as one JSON object (at most 16 KiB); an unknown query raises
        InvalidRequest."""
        if not isinstance(name, str) or not name:
            raise InvalidRequest("a query name must be a non-empty string")
        try:
            text = encode_object(args)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"query {name}: arguments that are not JSON: {e}") from None
        return decode_chunks(await self._remote("query", name, text))

    # -- affinity (issue 15) --

    @as_deferred
    async def affinity(self, cluster, rule=None):
        """Read (``rule`` None) or set the affinity rule of a virtual cluster:
        ``apart``, ``together`` or ``none``. -> {"owner", "cluster", "rule",
        "vms", "hosts", "honoured"[, "note"]}."""
        if not isinstance(cluster, str) or not cluster:
            raise InvalidRequest("give a cluster name")
        if rule is not None and rule not in ("apart", "together", "none"):
            raise InvalidRequest(f"affinity must be apart, together or none, not {rule!r}")
        return await self._remote("affinity", cluster, rule)

    # -- administration --------------------------------------------------------

    @as_deferred
    async def plugins(self):
        return await self._remote("plugins")

    @as_deferred
    async def register_plugin(self, name, event, config_file=None, order=None):
        return await self._remote("register_plugin", name, event, config_file, order)

    @as_deferred
    async def unregister_plugin(self, name, event=None):
        return await self._remote("unregister_plugin", name, event)

    @as_deferred
    async def forget_lnm(self, name):
        """Retire a disconnected LNM and the VMs last known on it (admins)."""
        return await self._remote("forget_lnm", name)

    # -- HA restart only with fencing (issue 15, part B) --

    @as_deferred
    async def confirm_fenced(self, lnm, evidence=None):
        """Say, as an administrator, that the host of disconnected ``lnm`` is
        off (its lost VMs may be restarted elsewhere) -> {"lnm", "fenced"}."""
        return await self._remote("confirm_fenced", lnm, evidence)

    # -- part A: maintenance and evacuation (issue 15) --

    @as_deferred
    async def maintenance(self, lnm, on, reason=None, evacuate=False, concurrency=None):
        """Put an LNM into maintenance (``on``: no new VMs; ``evacuate``:
        live-migrate its VMs off, ``concurrency`` at a time) or take it out
        (admins) -> its status, as ``evacuation``."""
        return await self._remote("maintenance", lnm, bool(on), reason, bool(evacuate),
                                  concurrency)

    @as_deferred
    async def evacuation(self, lnm):
        """The maintenance and evacuation progress of an LNM (admins):
        {"lnm", "maintenance", "reason", "evacuating", "done", "total",
        "moved": [{"name", "to"}], "failed": [{"name", "error"}],
        "running": [name], "waiting": int}."""
        return await self._remote("evacuation", lnm)


def _with_lnms(selection, lnms):
    """``selection`` (None, names, a Selection) as a Selection, with ``lnms``
    added to its LNM filter."""
    if selection is None:
        selection = Selection(everything=not lnms)
    elif isinstance(selection, (list, tuple)):
        selection = Selection(names=list(selection))
    if lnms:
        wire = selection.to_wire()
        wire["lnms"] = list(wire.get("lnms") or ()) + list(lnms)
        selection = Selection.from_wire(wire)
    return selection


async def gateway_login(client, *, stopped, daemon):
    """Log in a client a gateway (plusher, usherweb) opened for one of its
    users -> {"user", "admin", "domain"}. Usher's errors (wrong credentials,
    refused certificate …) as they are, anything else Unavailable; a login
    that finishes after ``stopped()`` became true is closed again."""
    try:
        who = await client.connect()
    except UsherError:
        raise
    except Exception as e:
        raise Unavailable(f"cannot connect to the controller: {e}") from None
    if stopped():
        await client.disconnect()
        raise Unavailable(f"{daemon} is shutting down")
    return who


def _operation(operation):
    def method(self, selection, args=None):
        return self.op_on(operation, selection, args)
    method.__name__ = operation
    allowed = ", ".join(sorted(OPERATION_PRECONDITIONS[operation]))
    method.__doc__ = f"{operation} the selected VMs (allowed from: {allowed})."
    return method


for _op in OPERATIONS:
    setattr(UsherClient, _op, _operation(_op))
del _op

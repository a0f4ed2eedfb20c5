"""usherbatchd's link to the controller: the few calls the policy needs,
through the client library (``UsherClient``: TLS, login, reconnection with
backoff). ``IClusterLink`` is the seam the tests fill with a double."""

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import Interface, implementer

from usher.client import Selection, UsherClient
from usher.errors import UsherError

log = Logger()

# The reason usherbatchd gives the maintenance hold of a host it powers down.
POWER_REASON = "powered down by usherbatchd"


class IClusterLink(Interface):
    def snapshot():
        """-> Deferred of (LNM dicts as list_lnm answers, every VM record)."""

    def start(short_name, lnm, args):
        """Start one VM on ``lnm`` -> Deferred of start's result."""

    def stop(short_name, hard):
        """Shut down (destroy, a hard power-off, when hard) one of our VMs ->
        Deferred of op_on's result."""

    def remove(short_name):
        """Delete one of our VMs whose job ended (powered off first if it
        still runs) -> Deferred."""

    def migrate(short_name, lnm):
        """-> Deferred of migrate's result."""

    def maintenance(lnm, on, reason):
        """Put ``lnm`` in maintenance (or out) -> Deferred of its status."""


@implementer(IClusterLink)
class ControllerLink(service.Service):
    """Logs in at start-up (retrying with a logged reason, never hanging) and
    stays connected; calls made while it is away fail with Unavailable."""

    def __init__(self, settings, reactor, client=None):
        self.settings = settings
        self.reactor = reactor
        self.client = client or UsherClient(
            reactor, settings.controller_host, settings.controller_port,
            ca_file=settings.ssl_ca_file, tls_name=settings.controller_tls_name,
            username=settings.username, password=settings.read_password(),
            timeout=settings.call_timeout)
        self._ready = None          # the login's answer once logged in
        self._waiters = []
        self._stopping = False
        self._attempt = None

    @property
    def connected(self):
        return self.client.connected

    def startService(self):
        super().startService()
        self._attempt = defer.Deferred.fromCoroutine(self._connect())

    async def _connect(self):
        delay = 1.0
        while not self._stopping:
            try:
                who = await self.client.connect()
            except UsherError as e:
                log.warn("usherbatchd: cannot log in to the controller at {host}:{port}: "
                         "{error}; trying again in {delay:g} s", host=self.client.host,
                         port=self.client.port, error=e, delay=delay)
                await task.deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, 60.0)
                continue
            if not who.get("admin"):
                log.error("usherbatchd: account {user} is not an administrator: it cannot see "
                          "other users' VMs or put hosts in maintenance", user=who.get("user"))
            log.info("usherbatchd logged in to the controller as {user}", user=who.get("user"))
            self._ready = who
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(who)
            return

    def when_ready(self):
        """-> a new Deferred firing once logged in (at once when it is)."""
        if self._ready is not None:
            return defer.succeed(self._ready)
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def stopService(self):
        self._stopping = True
        super().stopService()
        return self.client.disconnect()

    def full_name(self, short_name):
        return f"{short_name}.{self.client.user}.{self.client.domain}"

    @defer.inlineCallbacks
    def snapshot(self):
        lnms = yield self.client.list_lnm()
        vms = yield self.client.list(remote=True)
        return lnms, vms

    def start(self, short_name, lnm, args):
        return self.client.start([short_name], lnms=[lnm], args=args)

    def stop(self, short_name, hard):
        return self.client.op_on("destroy" if hard else "shutdown",
                                 Selection(names=[short_name]))

    def remove(self, short_name):
        return self.client.op_on("delete", Selection(names=[short_name]), {"force": True})

    def migrate(self, short_name, lnm):
        return self.client.migrate(Selection(names=[short_name]), lnms=[lnm])

    def maintenance(self, lnm, on, reason):
        # The maintenance hold (part A's PB method): no evacuation, the host is empty.
        return self.client.maintenance(lnm, on, reason=reason, evacuate=False, concurrency=None)

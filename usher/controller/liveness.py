"""The controller's watch over attached LNMs (paper, "Failures": "the
controller detects local node manager failures upon disconnect or TCP
timeout").

A disconnect is noticed by the LNM link itself. ``LNMLiveness`` covers the
silent peer: every attached LNM is pinged every ``interval`` seconds, and one
that has not answered for ``timeout`` seconds is detached (its VMs become
``lost``) and its connection aborted, so that it reattaches afresh once it
can.
"""

from twisted.application import service
from twisted.logger import Logger
from twisted.spread import pb

from usher.liveness import HEARTBEAT_TICK, HeardBroker, Heartbeat, enable_tcp_keepalive

log = Logger()


class LNMLiveness(service.Service):
    """An LNM watcher for ``Controller.watch_lnms``: a heartbeat per attached
    LNM (stopped with the service)."""

    def __init__(self, controller, *, clock, interval, timeout):
        self.controller = controller
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self._beats = {}   # LNM name -> (handle, Heartbeat)

    def lnm_attached(self, name, handle):
        self.lnm_detached(name, None)
        broker = getattr(handle, "broker", None)
        last_heard = (lambda: broker.last_heard) if isinstance(broker, HeardBroker) else None
        # The LNM pings after interval seconds of quiet (its own setting, the
        # same by default): the controller asks only if that did not come,
        # halfway between interval and timeout.
        patience = (self.interval + self.timeout) / 2 if self.timeout > self.interval \
            else self.interval
        beat = Heartbeat(handle.ping, clock=self.clock, interval=self.interval,
                         timeout=self.timeout, name=f"LNM {name}", last_heard=last_heard,
                         patience=patience, tick=HEARTBEAT_TICK,
                         on_silent=lambda silent_for: self._silent(name, handle,
                                                                   silent_for))
        self._beats[name] = (handle, beat)
        beat.start()

    def lnm_detached(self, name, handle):
        """Stop watching ``name`` (only if ``handle`` is the watched one, or
        whichever is watched when ``handle`` is None)."""
        entry = self._beats.get(name)
        if entry is None or (handle is not None and entry[0] is not handle):
            return
        del self._beats[name]
        entry[1].stop()

    def watching(self, name):
        return name in self._beats

    def _silent(self, name, handle, silent_for):
        self._beats.pop(name, None)
        log.error("LNM {lnm} has not answered for {seconds:.1f} s (timeout {timeout:g} s): "
                  "treating it as failed", lnm=name, seconds=silent_for,
                  timeout=self.timeout)
        self.controller.detach_lnm(name, handle)
        abort = getattr(handle, "abort", None) or handle.disconnect
        abort()

    def stop(self):
        for name in list(self._beats):
            self.lnm_detached(name, None)

    def stopService(self):
        super().stopService()
        self.stop()


class _KeepAliveBroker(HeardBroker):
    def connectionMade(self):
        pb.Broker.connectionMade(self)
        interval, timeout = self.factory.keepalive
        enable_tcp_keepalive(self.transport, interval=interval, timeout=timeout)


class KeepAlivePBServerFactory(pb.PBServerFactory):
    """A PB server factory whose connections have TCP keepalive (and
    ``TCP_USER_TIMEOUT``) set from the heartbeat's interval and timeout, and
    note when their LNM last sent anything (on ``clock``, for the
    heartbeat)."""

    protocol = _KeepAliveBroker

    def __init__(self, root, *, interval, timeout, clock=None):
        super().__init__(root)
        self.keepalive = (interval, timeout)
        self.clock = clock

"""A fleet: many local node managers in one process (``usherlnm --fleet N``).

Each member is a whole LNM built by ``usher.lnm.service.make_service`` — its
own libvirt test-driver host (a host file in its own state directory), its
own NodeManager, NodeAPI, monitor, its own mutual-TLS connection to the
controller under its own certificate (so the controller tells members apart
by their certificates' common names, as it tells real hosts apart) and its
own recovery listener. What members share is what a process has once: the
reactor, one thread pool for the blocking libvirt calls, and libvirt's event
loop thread. So hundreds of LNMs fit on a couple of cores, for benchmarks and
for trying placement and failure handling at scale on one machine.

Members are named ``<prefix><n>``; each takes its certificate and key from
``<cert_dir>/<name>_cert.pem`` and ``<name>_key.pem`` (what ``usher cert
issue --lnm <name> --out <cert_dir>`` writes; the controller's lnm_names must
allow the names, e.g. ``lnm[1-500]``), its state from
``<state_dir>/<name>``, and listens for recovery announcements on an
ephemeral port of ``recovery_interface`` (a fixed port cannot serve
hundreds of members; each tells the controller its own when it attaches).
Every other option comes from the fleet's configuration, shared by all.

Python API (the benchmarks use it in-process)::

    fleet = Fleet(config, reactor, cert_dir="/etc/usher/fleet", prefix="lnm")
    fleet.startService()
    await fleet.add(range(1, 101))          # lnm1 .. lnm100, started and ready
    fleet.members["lnm7"].manager           # that member's NodeManager
    await fleet.add([101], overrides={"controller_port": 7500})
    await fleet.stopService()
"""

import copy
import os
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from usher.errors import ConfigError
from usher.lnm.service import make_service

log = Logger()

# Threads of the shared pool unless the caller says: libvirt's test driver
# answers in microseconds, and Python runs one thread at a time anyway.
DEFAULT_FLEET_THREADS = 2

# The interpreter's thread switch interval while a fleet runs (Python's
# default is 5 ms). Every member's lifecycle events come through libvirt's
# one event thread, and its reads through the shared pool, each handing the
# interpreter lock to and from the reactor thread: at 500 out-of-band
# changes a second over 100 members, changes waited 0.3-1 s (median) at the
# default and 23 ms at 0.5 ms (bench/run.py figure 6, large profile). On
# hosts of their own, LNMs do not share one interpreter.
FLEET_SWITCH_INTERVAL = 0.0005


def member_names(prefix, numbers):
    """``prefix`` and numbers -> member names (``lnm1``, ``lnm2`` ...)."""
    return [f"{prefix}{number}" for number in numbers]


class Fleet(service.Service):
    """Many LNMs sharing a reactor and a thread pool; see the module docstring.

    ``config`` is a loaded LNM configuration (``usher.settings.LNM``); it
    must not name a hypervisor (``libvirt_uri``): members are test hosts
    (``test_host`` is implied).
    """

    def __init__(self, config, reactor, *, cert_dir, prefix="lnm", threads=None):
        lnm = config["lnm"]
        if lnm.get("libvirt_uri"):
            raise ConfigError("[lnm] libvirt_uri: a fleet runs embedded test hosts; "
                              "leave libvirt_uri unset")
        if not prefix or not prefix.replace("-", "").isalnum():
            raise ConfigError(f"fleet prefix {prefix!r}: use letters, digits and '-'")
        self.config = config
        self.reactor = reactor
        self.cert_dir = cert_dir
        self.prefix = prefix
        self.pool = ThreadPool(minthreads=0,
                               maxthreads=threads or DEFAULT_FLEET_THREADS,
                               name="usherlnm-fleet")
        self.members = {}       # name -> LNMService, in the order they were added
        self._switch_interval = None     # the interpreter's, while the fleet runs

    def member_config(self, name, overrides=None):
        """The configuration of member ``name``: the fleet's, with its own
        name, certificate, key, state directory and an ephemeral recovery
        port (then ``overrides``)."""
        config = copy.deepcopy(self.config)
        lnm = config["lnm"]
        lnm.update(name=name, test_host=True,
                   ssl_cert_file=os.path.join(self.cert_dir, f"{name}_cert.pem"),
                   ssl_key_file=os.path.join(self.cert_dir, f"{name}_key.pem"),
                   state_dir=os.path.join(lnm["state_dir"], name),
                   recovery_port=0)
        lnm.update(overrides or {})
        return config

    async def add(self, numbers, *, overrides=None):
        """Build and start the members numbered ``numbers`` (the fleet must be
        running); -> their LNMServices, once every one is ready (its
        hypervisor connected and first inventory taken; attaching to the
        controller follows on its own). A member that cannot start is
        stopped and removed, and the first such failure raised."""
        if not self.running:
            raise RuntimeError("start the fleet before adding members")
        names = member_names(self.prefix, numbers)
        taken = [name for name in names if name in self.members]
        if taken:
            raise ConfigError(f"fleet members already running: {', '.join(taken[:5])}")
        added = []
        for name in names:
            member = make_service(self.member_config(name, overrides), self.reactor,
                                  pool=self.pool, warn_test_host=False)
            self.members[name] = member
            added.append(member)
            member.startService()
        results = await defer.DeferredList([m.ready for m in added], consumeErrors=True)
        failures = [(m, result) for m, (ok, result) in zip(added, results) if not ok]
        for member, _failure in failures:
            await self.remove(member.name)
        if failures:
            member, failure = failures[0]
            log.error("fleet: {count} of {total} members could not start; first, {lnm}: "
                      "{error}", count=len(failures), total=len(added), lnm=member.name,
                      error=failure.getErrorMessage())
            failure.raiseException()
        log.info("fleet: {count} members running ({total} in all)", count=len(added),
                 total=len(self.members))
        return added

    def libvirt_connection(self, name):
        """Member ``name``'s own libvirt connection (None while it has none),
        to act on its host behind Usher's back as an administrator would with
        virsh; blocking calls on it belong in ``pool``."""
        return self.members[name].vmm.libvirt_connection

    async def remove(self, name):
        """Stop member ``name`` (detaching it from the controller) and forget it."""
        member = self.members.pop(name, None)
        if member is not None and member.running:
            await member.stopService()

    def startService(self):
        super().startService()
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, FLEET_SWITCH_INTERVAL))
        log.warn("fleet {prefix}*: every member runs an embedded libvirt TEST host (simulated: "
                 "its VMs run nothing)", prefix=self.prefix)
        self.pool.start()

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        members = list(self.members.values())
        self.members = {}
        await defer.DeferredList([defer.maybeDeferred(m.stopService) for m in members
                                  if m.running], consumeErrors=True)
        try:
            # Joins the workers: nothing submits work any more.
            self.pool.stop()
        finally:
            if self._switch_interval is not None:
                sys.setswitchinterval(self._switch_interval)
                self._switch_interval = None

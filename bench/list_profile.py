"""Where the time of a cluster-wide ``list`` goes (issue 16): the large
profile's 50,000 VMs of one ordinary user on 2,000 LNMs, in one process.

    python -m bench.list_profile [--vms 50000] [--lnms 2000] [--repeats 3]

It drives the real code path without a network: a real ``Controller``
(its ``GlobalState`` filled through ``add``, as starts fill it) with the
plugin registrations usherctrl loads when ctrl.config names none
(``usher.settings.default_plugin_registrations``); the client's
``list(remote=True)`` as the user's ``UserPerspective.perspective_list``
answers it (the PB boundary's encoding), carried as PB carries an answer
(jelly with the brokers' security, banana bytes and back) and decoded by the
real ``UsherClient``. The fresh client's sync (``subscribe``'s snapshot) is
timed the same way, for comparison. Each stage's time is the median of
``--repeats`` runs; a cProfile of one whole list follows (top 25 by
cumulative time). It prints figures; it asserts nothing about them.
"""

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import time
import uuid

from twisted.internet import defer, task
from twisted.spread import banana, pb

from usher import states
from usher.client import UsherClient
from usher.config import load_plugin_config
from usher.controller.client_link import UserPerspective
from usher.controller.core import Controller
from usher.controller.plugins import PluginRegistry
from usher.controller.state import LNMInfo
from usher.records import decode_records
from usher.settings import default_plugin_registrations

DOMAIN = "usher.test"
USER = "bench"


def build_controller(vms, lnms):
    """A controller with ``vms`` running VMs of USER spread over ``lnms``
    connected LNMs, and the default plugin registrations."""
    clock = task.Clock()
    controller = Controller(domain=DOMAIN, clock=clock, admins=["root"])
    controller.plugins = PluginRegistry(controller.chains, controller.api,
                                        load_config=load_plugin_config)
    controller.plugins.register_configured(default_plugin_registrations())
    state = controller.state
    names = [f"fleet{i:04d}" for i in range(1, lnms + 1)]
    for name in names:
        info = LNMInfo(name, {"hostname": name, "driver": "test", "cpus": 64,
                              "memory_mib": 1 << 20, "model": "bench"}, handle=object())
        state.lnms[name] = info
    for i in range(vms):
        record = state.new_record(f"{i + 1}.fill.{USER}.{DOMAIN}", state=states.RUN,
                                  lnm=names[i % lnms], memory_mib=256, vcpus=1,
                                  uuid=str(uuid.uuid4()), args={"cluster": "fill"})
        state.add(record)
    return controller, clock


class Wire:
    """A PB answer's way from the controller's broker to the client's: jelly
    with the server broker's security, banana bytes, received in pieces of
    ``PIECE`` bytes (what Twisted's TLS hands a protocol: one TLS record's
    plaintext at a time) and unjellied by the client's broker."""

    PIECE = 16 * 1024

    def __init__(self):
        self.server = pb.Broker(isClient=False)
        self.client = pb.Broker(isClient=True)
        self.bytes = 0

    @staticmethod
    def _banana():
        protocol = banana.Banana()
        protocol.connectionMade()
        protocol._selectDialect(b"none")
        return protocol

    def carry(self, value):
        sending, out = self._banana(), io.BytesIO()
        sending.transport = out
        sending.sendEncoded(self.server.serialize(value))
        encoded = out.getvalue()
        self.bytes = len(encoded)
        receiving, received = self._banana(), []
        receiving.expressionReceived = received.append
        for start in range(0, len(encoded), self.PIECE):
            receiving.dataReceived(encoded[start:start + self.PIECE])
        return self.client.unserialize(received[0])


class Perspective:
    """The client's view of its perspective: callRemote runs the real
    ``perspective_*`` method and carries its answer over the Wire."""

    def __init__(self, avatar, wire):
        self.avatar = avatar
        self.wire = wire

    def callRemote(self, method, *args):
        d = defer.maybeDeferred(getattr(self.avatar, f"perspective_{method}"), *args)
        return d.addCallback(self.wire.carry)


def result(d):
    """The result of a Deferred that has fired (nothing here waits)."""
    out = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("the call did not finish synchronously")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class CollectorWatch:
    """Python's garbage collections while it is on: how many, how many of
    them of the whole heap (generation 2), and their seconds."""

    def __init__(self):
        self.runs = self.full = 0
        self.seconds = 0.0
        self._started = None
        self.on = False
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if not self.on:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.runs += 1
            self.full += info["generation"] == 2
            self.seconds += time.perf_counter() - self._started

    def reset(self):
        self.runs = self.full = 0
        self.seconds = 0.0


WATCH = CollectorWatch()


def timed(function, repeats):
    """-> (median wall seconds, median CPU seconds of this process, the
    median run's collections (runs, full, seconds), the last value). The
    previous run's value is dropped before the next run."""
    runs, value = [], None
    for _ in range(repeats):
        value = None
        WATCH.reset()
        WATCH.on = True
        wall, cpu = time.perf_counter(), time.process_time()
        value = function()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu,
                     (WATCH.runs, WATCH.full, WATCH.seconds)))
        WATCH.on = False
    runs.sort(key=lambda run: run[0])
    middle = runs[len(runs) // 2]
    return (middle[0], statistics.median(run[1] for run in runs), middle[2], value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=50_000)
    parser.add_argument("--lnms", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--status", action="store_true", help="list -s (with figures)")
    parser.add_argument("--top", type=int, default=25, help="cProfile lines")
    parser.add_argument("--heap", type=int, default=0, metavar="N",
                        help="N more live objects in the process (small dicts), as the rest "
                             "of a long-running controller's heap: what a full garbage "
                             "collection goes through")
    options = parser.parse_args(argv)

    started = time.perf_counter()
    controller, clock = build_controller(options.vms, options.lnms)
    heap = [{"n": i} for i in range(options.heap)]
    gc.collect()
    print(f"{options.vms:,} VMs of {USER!r} on {options.lnms:,} LNMs"
          + (f" and {options.heap:,} more objects" if options.heap else "")
          + f", built in {time.perf_counter() - started:.2f} s; median of {options.repeats} runs")

    avatar = UserPerspective(controller, USER, False, None, clock=clock, call_timeout=60)
    wire = Wire()
    client = UsherClient(clock, "127.0.0.1", 1, ca_file=None, username=USER, password="x")
    client._perspective = Perspective(avatar, wire)
    client.user, client.domain, client.admin = USER, DOMAIN, False
    status = options.status
    repeats = options.repeats

    figures = []

    def stage(label, function):
        wall, cpu, collections, value = timed(function, repeats)
        figures.append((label, wall, cpu, collections))
        return value

    def show():
        print(f"  {'':<56} {'wall':>7} {'CPU':>7}   garbage collections (full), s")
        for label, wall, cpu, (runs, full, seconds) in figures:
            print(f"  {label:<56} {wall:7.3f} {cpu:7.3f} s {runs:5} ({full}) {seconds:6.3f} s")
        figures.clear()

    print("\nlist (client.list(remote=True)):")
    records = stage("controller: Controller.list (the records, as dicts)",
                    lambda: result(defer.Deferred.fromCoroutine(
                        controller.list(USER, False, None, status))))
    chunks = stage("boundary: perspective_list (the answer: JSON chunks)",
                   lambda: result(avatar.perspective_list(None, status)))
    carried = stage("PB: jelly, banana, 16 KiB pieces, unjelly", lambda: wire.carry(chunks))
    size = wire.bytes
    stage("client: decode_records", lambda: decode_records(carried))
    del carried
    listed = stage("whole: client.list(remote=True)",
                   lambda: result(client.list(remote=True, status=status)))
    show()
    print(f"  ({len(records):,} records, {len(listed):,} listed, {len(chunks)} chunks, "
          f"{size / 1e6:.1f} MB on the wire)")
    del records, listed, chunks

    print("\nfor comparison, a fresh client's sync (subscribe's snapshot):")

    def sync():
        snapshot = result(avatar.perspective_subscribe())
        avatar.logout()
        return snapshot

    snapshot = stage("boundary: perspective_subscribe (snapshot)", sync)
    carried = stage("PB: jelly, banana, 16 KiB pieces, unjelly", lambda: wire.carry(snapshot))
    stage("client: decode_records into its cache",
          lambda: {r["name"]: r for r in decode_records(carried["chunks"])})
    del carried
    show()

    print(f"\ncProfile of one client.list(remote=True), top {options.top} by cumulative time:")
    profile = cProfile.Profile()
    profile.enable()
    result(client.list(remote=True, status=status))
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(options.top)
    print(out.getvalue())
    del heap


if __name__ == "__main__":
    main()

"""Figure 7's load: many Usher clients in a process of their own, so that
the clients' own work neither slows the fleet of LNMs nor is slowed by it.

``python -m bench.clients`` (started by ``bench.run``; the password comes in
``USHER_BENCH_PASSWORD``) connects ``--count`` clients numbered from
``--first``, each subscribed to its own virtual cluster ``ops<k>``, starts
``--vms`` VMs in each and waits until they run, then prints ``ready``. On
SIGUSR1 every client issues operations back to back for ``--duration``
seconds — pause or resume of one of its VMs, and
every tenth operation a ``list`` of its cluster from the controller — and
the process prints one JSON line: every operation's latency and every error.

With ``--idle`` it only connects ``--count`` clients, each subscribed to all
the user's VMs (figure 3's), prints ``ready`` and keeps them connected
(applying the changes pushed to them) until SIGTERM.
"""

import argparse
import json
import os
import random
import signal
import sys
import time

from twisted.internet import defer, task

from usher.client import UsherClient
from usher.vmset import Selection


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--vms", type=int, default=0)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--idle", action="store_true",
                        help="only stay connected, subscribed to every VM")
    return parser.parse_args(argv)


def bench_client(reactor, options, **kwargs):
    """An UsherClient of the benchmark's user on the controller of ``options``."""
    return UsherClient(reactor, "127.0.0.1", options.port, ca_file=options.ca,
                       tls_name="localhost", username=options.user,
                       password=os.environ["USHER_BENCH_PASSWORD"], timeout=120, **kwargs)


# Logins at once: below the controller's max_concurrent_logins (16), which
# turns away more (50 idle clients logging in while the controller is busy
# with 50,000 VMs hit it).
LOGIN_BATCH = 8


# How long the clients' own VMs may take to run (a bound, not a measure).
START_PATIENCE = 300.0


async def connect_all(clients):
    clients = list(clients)
    for first in range(0, len(clients), LOGIN_BATCH):
        await defer.gatherResults([c.connect() for c in clients[first:first + LOGIN_BATCH]])


def ready_until(reactor, signum):
    """Say "ready" to the parent -> a Deferred fired when it sends ``signum``."""
    fired = defer.Deferred()

    def on_signal(_signum, _frame):
        reactor.callFromThread(lambda: fired.called or fired.callback(None))

    signal.signal(signum, on_signal)
    print("ready", flush=True)
    return fired


async def stay_connected(reactor, options):
    clients = [bench_client(reactor, options) for _ in range(options.count)]
    await connect_all(clients)
    await ready_until(reactor, signal.SIGTERM)
    await defer.gatherResults([c.disconnect() for c in clients])
    print(json.dumps({"vms_seen": [len(c.vms) for c in clients]}), flush=True)


async def run(reactor, options):
    numbers = range(options.first, options.first + options.count)
    clients = {k: bench_client(reactor, options, clusters=[f"ops{k}"]) for k in numbers}
    await connect_all(clients.values())
    names = {k: [f"{i}.ops{k}.{options.user}.{options.domain}"
                 for i in range(1, options.vms + 1)] for k in numbers}
    results = await defer.gatherResults([c.start(cluster=f"ops{k}", count=options.vms)
                                         for k, c in clients.items()])
    failed = [entry for result in results for entry in result["failed"]]
    if failed:
        raise RuntimeError(f"{len(failed)} VMs failed to start: {failed[:3]}")
    deadline = time.monotonic() + START_PATIENCE
    while not all(c.vms.get(n, {}).get("state") == "run"
                  for k, c in clients.items() for n in names[k]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the clients' VMs not all running after {START_PATIENCE:g} s")
        await task.deferLater(reactor, 0.05, lambda: None)
    await ready_until(reactor, signal.SIGUSR1)
    latencies, errors = [], []
    deadline = time.monotonic() + options.duration

    async def work(k, client):
        own = names[k]
        paused = set()
        step = random.Random(k).randrange(len(own))
        while time.monotonic() < deadline:
            step += 1
            began = time.monotonic()
            try:
                if step % 10 == 0:
                    listed = await client.list(Selection(clusters=[f"ops{k}"]), remote=True)
                    if len(listed) != len(own):
                        errors.append(f"client {k}: list returned {len(listed)} VMs")
                else:
                    name = own[step % len(own)]
                    if name in paused:
                        result = await client.resume([name])
                        paused.discard(name)
                    else:
                        result = await client.pause([name])
                        paused.add(name)
                    if result["failed"]:
                        errors.append(f"client {k}: {result['failed']}")
            except Exception as e:
                errors.append(f"client {k}: {e.__class__.__name__}: {e}")
            latencies.append(time.monotonic() - began)
        # Leave every VM running.
        if paused:
            await client.resume(sorted(paused))

    began = time.monotonic()
    await defer.gatherResults([defer.Deferred.fromCoroutine(work(k, c))
                               for k, c in clients.items()])
    elapsed = time.monotonic() - began
    await defer.gatherResults([c.disconnect() for c in clients.values()])
    print(json.dumps({"latencies": latencies, "errors": errors, "elapsed": elapsed}),
          flush=True)


def main(argv=None):
    options = parse(argv)
    from twisted.internet import reactor

    outcome = []

    async def body():
        try:
            await (stay_connected if options.idle else run)(reactor, options)
        except Exception as e:
            outcome.append(e)
            print(json.dumps({"fatal": f"{e.__class__.__name__}: {e}"}), flush=True)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(body()))
    reactor.run()
    return 1 if outcome else 0


if __name__ == "__main__":
    sys.exit(main())

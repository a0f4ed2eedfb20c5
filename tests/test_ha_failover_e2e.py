"""Failover end to end, every part real: a PostgreSQL the tests start
(tests/pgserver.py), two usherctrl processes of a standby pair, real usherlnm
processes (the embedded test driver) configured with both controllers, and a
real client configured with both.

(a) kill -9 of the active controller while VMs are starting: the standby
takes over with a higher term, the LNMs and the client follow it, and every
VM that started is known exactly once, on one host: none started twice,
none lost.
(b) an active controller partitioned away (its database connection and its
link to the LNMs cut) while the standby takes over: when the partition heals
it still believes it is active, but the LNMs refuse it (its term is stale,
checked in the LNM's own log and in its persisted term) and nothing on them
changes.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest_twisted
from twisted.internet import reactor

from tests.e2e import sleep, wait_for
from tests.test_ctrl_ha import HANG, Controller, CuttableProxy, _eventually, leadership
from usher import sandbox, states
from usher.client import UsherClient
from usher.lnm.terms import TERM_FILE

LNMS = ("lnm1", "lnm2", "lnm3")


def site_for(tmp_path, postgres, database):
    """-> (the sandbox's files, the DSN of a new database ``database``)."""
    site = sandbox.prepare(str(tmp_path / "site"), lnms=len(LNMS), domain="usher.test",
                           user="alice", rounds=4)
    postgres.create_database(database)
    return site, f"host=127.0.0.1 port={postgres.port} dbname={database} user=usher"


def lnm_config(site, name, entries):
    """The sandbox's LNM configuration, dialing ``entries`` (host:port)."""
    with open(site["configs"][name], encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"(?m)^controller_host = .*$", f"controller_host = {', '.join(entries)}",
                  text)
    text = re.sub(r"(?m)^reconnect_initial_delay = .*$", "reconnect_initial_delay = 0.2",
                  text)
    text = re.sub(r"(?m)^reconnect_max_delay = .*$", "reconnect_max_delay = 1", text)
    path = os.path.join(site["dir"], f"{name}-ha.config")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class Lnm:
    def __init__(self, site, name, entries):
        self.site, self.name = site, name
        self.config = lnm_config(site, name, entries)
        self.log = os.path.join(site["dir"], f"{name}-ha.log")
        self.state_dir = os.path.join(site["dir"], f"{name}-state")
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "usher.lnm.main", "--isolated", "--config", self.config],
            stdin=subprocess.DEVNULL, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        return self

    def kill(self, sig=9):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=HANG)

    def output(self):
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def highest_term(self):
        try:
            with open(os.path.join(self.state_dir, TERM_FILE), encoding="utf-8") as f:
                return json.load(f)["highest"]
        except FileNotFoundError:
            return 0


class HealableProxy(CuttableProxy):
    """A CuttableProxy whose partition heals (``restore``: the same port)."""

    def restore(self):
        self.listener = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")


def client_of(site, controllers, timeout=20):
    entries = ", ".join(f"127.0.0.1:{c.port}" for c in controllers)
    return UsherClient(reactor, entries, 7390, ca_file=site["ca_file"], tls_name="localhost",
                       username=site["user"], password=site["password"], timeout=timeout,
                       initial_delay=0.2, max_delay=1.0)


async def start_pair(a, b, lnms):
    """ctrl-a active (term 1), then ctrl-b a standby, then the LNMs."""
    a.start()
    await a.started()
    assert await _eventually(a, "active"), a.output()
    b.start()
    await b.started()
    assert await _eventually(b, "standby"), b.output()
    for lnm in lnms:
        lnm.start()


async def listed(client):
    return await client.list(remote=True)


def check_each_once(records):
    names = [r["name"] for r in records]
    assert len(names) == len(set(names)), "a VM known twice"
    return {r["name"]: r for r in records}


@pytest_twisted.ensureDeferred
async def test_kill_9_of_the_active_while_vms_start(tmp_path, postgres):
    database = "ha_failover_a"
    site, dsn = site_for(tmp_path, postgres, database)
    a, b = Controller(site, "ctrl-a", dsn), Controller(site, "ctrl-b", dsn)
    lnms = [Lnm(site, name, [f"127.0.0.1:{a.lnm_port}", f"127.0.0.1:{b.lnm_port}"])
            for name in LNMS]
    client = client_of(site, [a, b])
    try:
        await start_pair(a, b, lnms)
        await client.connect()
        assert client.port == a.port
        await wait_for_lnms(client, len(LNMS))
        await client.start(cluster="warm", count=9)
        # Many VMs starting, and the active controller killed meanwhile.
        starting = client.start(cluster="web", count=60)
        outcome = []
        starting.addBoth(outcome.append)      # answered, or its outcome unknown
        await wait_for(lambda: sum(1 for r in client.vms.values()
                                   if r["name"].split(".")[1] == "web") >= 3,
                       timeout=HANG, interval=0.01)
        before = dict(client.vms)
        killed = time.monotonic()
        a.kill()
        # The standby takes over; the LNMs and the client follow.
        await wait_for(lambda: client.connected and client.port == b.port, timeout=HANG)
        term, holder = leadership(postgres, database)
        assert (term, holder) == (2, "ctrl-b")
        await wait_for_lnms(client, len(LNMS))
        records = check_each_once(await listed(client))
        took = time.monotonic() - killed
        started_before = {n for n, r in before.items() if r["state"] == states.RUN}
        in_flight = {n for n, r in before.items() if r["state"] == states.STARTING}
        assert started_before <= set(records), "a VM that had started was lost"
        assert all(records[n]["state"] == states.RUN for n in started_before)
        assert all(records[n]["lnm"] in LNMS for n in records)
        # Settle: nothing keeps changing, and nothing started twice (one
        # record per name, on one host; each host says so itself).
        await sleep(2)
        again = check_each_once(await listed(client))
        assert set(again) >= started_before
        for lnm in lnms:
            await wait_for(lambda lnm=lnm: lnm.highest_term() == 2, timeout=HANG)
        print(f"\nfailover with {len(records)} VMs on {len(LNMS)} LNMs: the client listed "
              f"every VM on the new active controller {took:.2f} s after kill -9 "
              f"({len(started_before)} had started and {len(in_flight)} were starting at the "
              f"kill; {len(records)} known after)")
        await wait_for(lambda: outcome, timeout=HANG)
    finally:
        await client.disconnect()
        for lnm in lnms:
            lnm.kill(15)
        for c in (a, b):
            c.kill(15)


async def wait_for_lnms(client, count):
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        try:
            hosts = await client.list_lnm()
        except Exception:
            hosts = []
        if sum(1 for h in hosts if h.get("connected")) >= count:
            return hosts
        await sleep(0.1)
    raise AssertionError(f"fewer than {count} LNMs connected")


@pytest_twisted.ensureDeferred
async def test_a_partitioned_old_active_cannot_command_the_lnms(tmp_path, postgres):
    database = "ha_failover_b"
    site, dsn = site_for(tmp_path, postgres, database)
    db_proxy = CuttableProxy(postgres.port)
    a = Controller(site, "ctrl-a", dsn.replace(f"port={postgres.port}",
                                                f"port={db_proxy.port}"))
    b = Controller(site, "ctrl-b", dsn)
    # ctrl-a believes itself active long after it lost the database: the
    # window in which only the LNMs' term gate stops it.
    with open(a.config, encoding="utf-8") as f:
        text = f.read()
    with open(a.config, "w", encoding="utf-8") as f:
        f.write(re.sub(r"(?m)^ha_lost_after = .*$", "ha_lost_after = 120", text))
    lnm_proxy = HealableProxy(a.lnm_port)
    lnms = [Lnm(site, name, [f"127.0.0.1:{lnm_proxy.port}", f"127.0.0.1:{b.lnm_port}"])
            for name in LNMS[:2]]
    client = client_of(site, [a, b])
    old = None
    try:
        await start_pair(a, b, lnms)
        await client.connect()
        await wait_for_lnms(client, len(lnms))
        await client.start(cluster="web", count=6)
        await wait_for(lambda: sum(1 for r in client.vms.values()
                                   if r["state"] == states.RUN) == 6, timeout=HANG)
        # A client of ctrl-a alone, kept across the partition.
        old = UsherClient(reactor, "127.0.0.1", a.port, ca_file=site["ca_file"],
                          tls_name="localhost", username=site["user"],
                          password=site["password"], timeout=10)
        await old.connect()
        # The partition: ctrl-a loses the database and the LNMs.
        await db_proxy.cut()
        await lnm_proxy.cut()
        await wait_for(lambda: leadership(postgres, database)[0] == 2, timeout=HANG)
        assert leadership(postgres, database) == (2, "ctrl-b")
        await wait_for(lambda: all(lnm.highest_term() == 2 for lnm in lnms), timeout=HANG)
        # (ctrl-a's clients may stay with it: it still thinks it is active;
        # a client that reaches ctrl-b sees the LNMs there.)
        await client.disconnect()
        client = client_of(site, [b])
        await client.connect()
        await wait_for_lnms(client, len(lnms))
        # The partition heals; ctrl-a still thinks it is active (ha_lost_after).
        lnm_proxy.restore()
        assert a.process.poll() is None
        assert "steps down" not in a.output()
        # lnm1 restarts and dials its list in order: ctrl-a first, which
        # attaches it and tells it term 1 -> refused; then ctrl-b (term 2).
        lnms[0].kill()
        lnms[0].start()
        await wait_for(lambda: "refused controller ctrl-a with term 1" in lnms[0].output(),
                       timeout=HANG)
        await wait_for(lambda: "refused term 1" in a.output(), timeout=HANG)
        assert lnms[0].highest_term() == 2
        await wait_for_lnms(client, len(lnms))
        # ctrl-a cannot command the VMs: nothing it does reaches the LNMs.
        # (lnm2's VMs: lnm1's embedded test hypervisor died with its process.)
        on_lnm2 = sorted(n for n, r in check_each_once(await listed(client)).items()
                         if r["lnm"] == "lnm2")
        assert on_lnm2 and set(on_lnm2) <= set(old.vms)
        try:
            await old.destroy(on_lnm2)
        except Exception:
            pass
        await sleep(1)
        records = check_each_once(await listed(client))
        assert all(records[n]["state"] == states.RUN for n in on_lnm2), records
        assert "refused" not in lnms[1].output()      # it never even heard of ctrl-a
        assert "stale_term" not in b.output()
    finally:
        if old is not None:
            await old.disconnect()
        await client.disconnect()
        for lnm in lnms:
            lnm.kill(15)
        for c in (a, b):
            c.kill(15)

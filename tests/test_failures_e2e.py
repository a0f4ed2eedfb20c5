"""Failures end to end (paper, "Failures"; README, "Failures and recovery").

A controller and three LNMs as separate processes over real TLS on
127.0.0.1; each LNM drives its own private libvirtd (``tests/libvirtd.py``),
so VMs outlive their LNM as on real hosts, and the test sees each host's
domains through its own libvirt connection: the independent count that
shows no VM runs twice. The link between the controller and one LNM is cut
with a proxy the test controls (``bench/proxy.py``).

Timeouts are short (ping every 0.5 s, silent after 2 s) to keep the tests
fast; the detection and recovery times measured are printed (run with -s).
"""

import time

import libvirt
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from usher import states
from usher.errors import InvalidRequest, LinkFailure, NoSuchVM

from bench.proxy import CuttableProxy
from tests import libvirtd
from tests.e2e import RunningSandbox, override_settings, sleep, wait_for

pytestmark = pytest.mark.skipif(not libvirtd.available(),
                                reason="needs root and libvirtd (Debian: libvirt-daemon)")

DOMAIN = "usher.test"
PING_INTERVAL = 0.5
PING_TIMEOUT = 2.0
# Detection may take the timeout plus one interval (the last answer came an
# interval before the peer fell silent) plus scheduling slack on a busy box.
DETECTION_BOUND = PING_TIMEOUT + PING_INTERVAL + 1.5

CTRL = {"lnm_ping_interval": PING_INTERVAL, "lnm_ping_timeout": PING_TIMEOUT,
        "recovery_window": 20, "call_timeout": 5, "start_timeout": 10,
        "default_memory": 8}
LNM = {"ping_interval": PING_INTERVAL, "ping_timeout": PING_TIMEOUT,
       "reconnect_initial_delay": 0.3, "reconnect_max_delay": 1, "call_timeout": 5,
       "scan_interval": 1}

MEASURED = {}


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def report(what, seconds):
    MEASURED[what] = seconds
    print(f"\n[measured] {what}: {seconds:.2f} s")


class System:
    """Three private libvirtds and a sandbox whose LNMs use them."""

    def __init__(self, tmp_path, *, ctrl=None, lnm=None, proxied=()):
        self.tmp_path = tmp_path
        self.hosts = {f"lnm{i}": libvirtd.PrivateLibvirtd(tmp_path / f"libvirtd{i}")
                      for i in (1, 2, 3)}
        self.ctrl_settings = dict(CTRL, **(ctrl or {}))
        self.lnm_settings = dict(LNM, **(lnm or {}))
        self.proxied = proxied
        self.proxies = {}
        self.box = None

    async def start(self):
        try:
            return await self._start()
        except BaseException:
            await self.stop()          # nothing left running behind a failed start
            raise

    async def _start(self):
        await defer.gatherResults([threads.deferToThread(h.start) for h in
                                   self.hosts.values()], consumeErrors=True)
        settings = {"ctrl": self.ctrl_settings, "lnm": self.lnm_settings}
        for name, host in self.hosts.items():
            settings[name] = {"libvirt_uri": host.uri}
        self.box = RunningSandbox(self.tmp_path / "box", lnms=3, settings=settings)
        for name in self.proxied:
            proxy = CuttableProxy(reactor, "127.0.0.1", self.box.description["lnm_port"])
            port = await proxy.start()
            self.proxies[name] = proxy
            override_settings(self.box.description["configs"][name],
                              {"controller_port": port})
        # The controller first, so that no LNM starts with a failed attempt
        # (and a first backoff delay): some tests give LNMs long ones.
        configs = self.box.description["configs"]
        self.box.box.spawn("usherctrl", "usher.controller.main", configs["ctrl"])
        await self._listening(self.box.description["lnm_port"])
        for name in self.box.description["lnms"]:
            self.box.box.spawn(name, "usher.lnm.main", configs[name])
        await self.box.box.wait_ready(60)
        return self

    async def _listening(self, port, timeout=30.0):
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol
        deadline = time.monotonic() + timeout
        while True:
            try:
                proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                              Protocol())
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await sleep(0.05)
            else:
                proto.transport.abortConnection()
                return

    async def stop(self):
        if self.box is not None and self.box.box.children:
            await self.box.stop()
        for proxy in self.proxies.values():
            await proxy.stop()
        for host in self.hosts.values():
            await threads.deferToThread(host.stop)

    async def client(self, **kwargs):
        kwargs.setdefault("initial_delay", 0.2)
        kwargs.setdefault("max_delay", 1.0)
        return await self.box.connected_client(**kwargs)

    async def inventories(self):
        """{LNM: {domain name: libvirt state code}}, asked of each libvirtd."""
        names = sorted(self.hosts)
        found = await defer.gatherResults([threads.deferToThread(self.hosts[n].domains)
                                           for n in names])
        return dict(zip(names, found))

    async def where(self):
        """{VM name: [LNMs whose host has it]}."""
        located = {}
        for lnm, domains in (await self.inventories()).items():
            for name in domains:
                located.setdefault(name, []).append(lnm)
        return located

    def host_call(self, lnm, function):
        """Run function(conn) on LNM's host through the test's own libvirt
        connection, behind Usher's back (in a thread)."""
        def run():
            with self.hosts[lnm].connection() as conn:
                return function(conn)
        return threads.deferToThread(run)


@pytest_twisted.async_yield_fixture
async def system(tmp_path):
    box = System(tmp_path)
    await box.start()
    yield box
    await box.stop()


async def until(predicate, timeout=20.0):
    """Poll until predicate() is true -> seconds it took."""
    started = time.monotonic()
    await wait_for(predicate, timeout=timeout, interval=0.02)
    return time.monotonic() - started


def states_of(client, names):
    return {n: client.vms.get(n, {}).get("state") for n in names}


def record_states(client):
    """Every state each VM was seen in by the client, in order."""
    seen = {}
    client.on_change(lambda changed, removed: [
        seen.setdefault(r["name"], []).append(r["state"]) for r in changed])
    return seen


async def start_on_each_lnm(client, cluster, per_lnm=2):
    result = await client.start(cluster=cluster, count=3 * per_lnm)
    assert result["failed"] == []
    names = sorted(s["name"] for s in result["started"])
    await wait_for(lambda: all(client.vms.get(n, {}).get("state") == states.RUN
                               for n in names))
    by_lnm = {}
    for s in result["started"]:
        by_lnm.setdefault(s["lnm"], []).append(s["name"])
    assert sorted(by_lnm) == ["lnm1", "lnm2", "lnm3"]
    return names, by_lnm


@pytest_twisted.ensureDeferred
async def test_lnm_killed_its_vms_are_lost_then_back_when_it_restarts(system):
    alice = await system.client()
    seen = record_states(alice)
    names, by_lnm = await start_on_each_lnm(alice, "kill9")
    victims = sorted(by_lnm["lnm2"])

    await system.box.kill("lnm2")
    detected = await until(lambda: all(s == states.LOST
                                       for s in states_of(alice, victims).values()))
    report("kill -9 LNM -> its VMs lost", detected)
    assert detected < DETECTION_BOUND
    assert all(alice.vms[n]["state"] == states.RUN for n in names if n not in victims)
    lnms = {lnm["name"]: lnm for lnm in await alice.list_lnm()}
    assert lnms["lnm2"]["connected"] is False
    # The VMs still run on their host: lost, not stopped.
    assert set(victims) <= set((await system.inventories())["lnm2"])
    # A lost VM keeps its name: starting it again is refused, never a copy.
    with pytest.raises(InvalidRequest, match="lost"):
        await alice.start([victims[0].split(".")[0] + ".kill9"])

    system.box.restart("lnm2")
    recovered = await until(lambda: all(s == states.RUN
                                        for s in states_of(alice, victims).values()))
    report("LNM restarted -> its VMs back (process start included)", recovered)
    for name in names:
        assert alice.vms[name]["state"] == states.RUN
        assert states.SHUTOFF not in seen.get(name, [])
    where = await system.where()
    assert {n: where.get(n) for n in names} == {
        n: [lnm] for lnm, vms in by_lnm.items() for n in vms}


@pytest_twisted.ensureDeferred
async def test_lnm_killed_in_the_middle_of_a_start(system):
    """Every VM of the request gets an answer; once the LNM is back, each
    takes the state its host shows — running once, shut off if the kill came
    between its definition and its boot — and those never created are gone."""
    alice = await system.client()
    count = 150
    starting = alice.start(cluster="midway", count=count, lnms=["lnm2"])
    await wait_for(lambda: sum(1 for r in alice.vms.values()
                               if r["state"] == states.RUN) >= 10, timeout=30, interval=0.005)
    await system.box.kill("lnm2")
    result = await starting
    answered = [s["name"] for s in result["started"]] + [f["name"] for f in result["failed"]]
    assert sorted(answered) == sorted(full(f"{i}.midway") for i in range(1, count + 1))
    assert result["failed"], "the kill came too late"
    for failure in result["failed"]:
        assert ("outcome is unknown" in failure["error"]
                or "disconnected before" in failure["error"]), failure
    # The notifications that follow the answer: every VM run or lost, none
    # left starting, none shut off.
    await until(lambda: {r["state"] for r in alice.vms.values()} <= {states.RUN, states.LOST})
    assert states.LOST in {r["state"] for r in alice.vms.values()}

    system.box.restart("lnm2")
    await until(lambda: states.LOST not in {r["state"] for r in alice.vms.values()})
    await sleep(1.0)
    host = (await system.inventories())["lnm2"]
    assert set(alice.vms) == set(host)
    for name, code in host.items():
        expected = states.RUN if code == libvirt.VIR_DOMAIN_RUNNING else states.SHUTOFF
        assert alice.vms[name]["state"] == expected, name
    started = {s["name"] for s in result["started"]}
    assert started <= set(host)
    assert all(alice.vms[n]["state"] == states.RUN for n in started)
    where = await system.where()
    assert all(where[n] == ["lnm2"] for n in host)


@pytest_twisted.async_yield_fixture
async def proxied_system(tmp_path):
    box = System(tmp_path, proxied=["lnm2"])
    await box.start()
    yield box
    await box.stop()


@pytest_twisted.ensureDeferred
async def test_cut_link_vms_lost_then_back_with_no_duplicates(proxied_system):
    system = proxied_system
    proxy = system.proxies["lnm2"]
    alice = await system.client()
    seen = record_states(alice)
    names, by_lnm = await start_on_each_lnm(alice, "cut")
    victims = sorted(by_lnm["lnm2"])

    proxy.cut()
    # A command sent into the cut: it must end with a clear error, not hang.
    paused = alice.pause([victims[0]])
    detected = await until(lambda: all(s == states.LOST
                                       for s in states_of(alice, victims).values()))
    report("cut link -> its VMs lost (silent peer, heartbeat)", detected)
    assert detected < DETECTION_BOUND
    result = await paused
    assert result["done"] == []
    assert [f["name"] for f in result["failed"]] == [victims[0]]
    assert "outcome is unknown" in result["failed"][0]["error"]
    # Meanwhile the VMs run on, and retries cannot copy them elsewhere.
    with pytest.raises(InvalidRequest, match="lost"):
        await alice.start([victims[1].split(".")[0] + ".cut"])
    more = await alice.start(cluster="cutmore", count=4)
    assert {s["lnm"] for s in more["started"]} <= {"lnm1", "lnm3"}
    assert len(more["started"]) + len(more["failed"]) == 4

    proxy.heal()
    recovered = await until(lambda: all(
        alice.vms[n]["state"] in (states.RUN, states.PAUSED) for n in victims))
    report("link healed -> its VMs back", recovered)
    await sleep(1.5)   # a scan later: nothing changes any more
    where = await system.where()
    for name in names + [s["name"] for s in more["started"]]:
        assert len(where.get(name, [])) == 1, (name, where.get(name))
    assert {n: where[n] for n in names} == {n: [lnm] for lnm, vms in by_lnm.items()
                                            for n in vms}
    # The controller's view is the hosts' truth: the pause that went into the
    # cut either happened or not, and the state says which.
    inventories = await system.inventories()
    actual = inventories["lnm2"][victims[0]]
    expected = states.PAUSED if actual == libvirt.VIR_DOMAIN_PAUSED else states.RUN
    assert alice.vms[victims[0]]["state"] == expected
    for name in names:
        assert states.SHUTOFF not in seen.get(name, [])


@pytest_twisted.async_yield_fixture
async def slow_reconnecting_system(tmp_path):
    # LNMs that would wait 20+ s to redial on their own: only the recovery
    # announcement explains a quick return.
    box = System(tmp_path, lnm={"reconnect_initial_delay": 20, "reconnect_max_delay": 30})
    await box.start()
    yield box
    await box.stop()


@pytest_twisted.ensureDeferred
async def test_controller_killed_mid_start_then_restarted(slow_reconnecting_system):
    system = slow_reconnecting_system
    alice = await system.client()
    notices = []
    alice.on_connection(lambda state, detail: notices.append(state))
    count = 600
    starting = alice.start(cluster="big", count=count)
    await wait_for(lambda: sum(1 for r in alice.vms.values()
                               if r["state"] == states.RUN) >= 20, timeout=30, interval=0.005)
    await system.box.kill("usherctrl")
    killed_at = time.monotonic()
    # The client's start in flight ends with a clear error.
    with pytest.raises(LinkFailure, match="outcome is unknown"):
        await starting
    await until(lambda: "reconnecting" in notices)

    # Starts already sent finish on the LNMs; wait for the hosts to settle.
    before = None
    while True:
        where = await system.where()
        if where == before:
            break
        before = where
        await sleep(0.5)
    on_hosts = {n for n in where if n.endswith(f".big.alice.{DOMAIN}")}
    assert 20 <= len(on_hosts) < count
    assert all(len(lnms) == 1 for lnms in where.values()), "a VM runs twice"

    system.box.restart("usherctrl")
    back = await until(lambda: alice.connected and set(alice.vms) == on_hosts, timeout=30)
    report(f"controller restarted -> client reconnected with all {len(on_hosts)} VMs "
           "(process start included)", back)
    lnms = await alice.list_lnm()
    assert all(lnm["connected"] for lnm in lnms)
    report("controller kill -9 -> restart -> recovered (total)",
           time.monotonic() - killed_at)
    # The controller's own figure: from its start to every LNM back, thanks to
    # the announcement (the LNMs would have waited 20 s or more to redial).
    log_path = system.box.dir + "/logs/usherctrl.log"
    with open(log_path, encoding="utf-8") as f:
        recovered = [line for line in f if "every LNM known before the restart is back" in line]
    assert len(recovered) == 1
    seconds = float(recovered[0].rsplit("after ", 1)[1].split(" s")[0])
    report("controller start -> all LNMs reattached (announcement)", seconds)
    assert seconds < 10
    # Rebuilt from the hosts: every VM that started is known once, running.
    assert all(alice.vms[n]["state"] == states.RUN for n in on_hosts)
    listed = await alice.list(remote=True)
    managed = sorted(r["name"] for r in listed if r.get("managed"))
    assert managed == sorted(on_hosts)
    assert "connected" in notices[notices.index("reconnecting"):]
    # The rest of the request, asked again: no name twice, no VM twice.
    rest = await alice.start(cluster="big", count=count - len(on_hosts))
    assert rest["failed"] == []
    started_now = {s["name"] for s in rest["started"]}
    assert not started_now & on_hosts
    await sleep(1.5)
    where = await system.where()
    big = {n: lnms for n, lnms in where.items() if n.endswith(f".big.alice.{DOMAIN}")}
    assert len(big) == count and all(len(lnms) == 1 for lnms in big.values())
    assert set(big) == on_hosts | started_now
    # The same client keeps receiving notifications.
    changes = []
    alice.on_change(lambda changed, removed: changes.extend(
        (r["name"], r["state"]) for r in changed))
    victim = sorted(on_hosts)[0]
    await alice.pause([victim])
    await until(lambda: (victim, states.PAUSED) in changes)


@pytest_twisted.ensureDeferred
async def test_vm_destroyed_behind_usher_back_is_missing(system):
    alice = await system.client()
    names, by_lnm = await start_on_each_lnm(alice, "oob", per_lnm=1)
    victim = by_lnm["lnm1"][0]

    def destroy(conn):
        dom = conn.lookupByName(victim)
        dom.destroy()
        dom.undefine()
    await system.host_call("lnm1", destroy)
    detected = await until(lambda: alice.vms[victim]["state"] == states.MISSING)
    report("VM destroyed behind Usher's back -> missing", detected)
    assert detected < LNM["scan_interval"] + 2
    assert all(alice.vms[n]["state"] == states.RUN for n in names if n != victim)
    # Deleting a missing VM removes it from Usher.
    result = await alice.delete([victim])
    assert result["done"] == [{"name": victim, "state": None}]
    await until(lambda: victim not in alice.vms)


@pytest_twisted.ensureDeferred
async def test_vm_started_behind_usher_back_is_quarantined_or_unmanaged(system):
    """A VM with a managed name that Usher did not start is not given to the
    user it names (anyone with access to a host could forge it): it is
    quarantined, listed as unmanaged with the reason."""
    alice = await system.client()
    stray, stranger = full("7.extra"), "stranger.example.org"

    def create(conn):
        for name in (stray, stranger):
            conn.createXML(libvirtd.domain_xml(name), 0)
    await system.host_call("lnm3", create)
    listed = {}
    started = time.monotonic()
    while not {stray, stranger} <= set(listed):
        assert time.monotonic() - started < 20, listed
        listed = {r["name"]: r for r in await alice.list(remote=True)}
    report("VM started behind Usher's back -> quarantined", time.monotonic() - started)
    for name in (stray, stranger):
        assert listed[name]["managed"] is False and listed[name]["lnm"] == "lnm3"
        assert listed[name]["owner"] is None
    assert "no record" in listed[stray]["quarantined"]
    assert "quarantined" not in listed[stranger]
    assert stray not in alice.vms and stranger not in alice.vms
    # Not alice's: she cannot operate it.
    with pytest.raises(NoSuchVM):
        await alice.pause([stray])


@pytest_twisted.ensureDeferred
async def test_libvirtd_restart_vms_unknown_not_stopped_then_reconnected(system):
    alice = await system.client()
    seen = record_states(alice)
    names, by_lnm = await start_on_each_lnm(alice, "hv", per_lnm=2)
    victims = sorted(by_lnm["lnm1"])

    await threads.deferToThread(system.hosts["lnm1"].kill)
    detected = await until(lambda: all(s == states.UNKNOWN
                                       for s in states_of(alice, victims).values()))
    report("libvirtd killed -> its VMs unknown", detected)
    lnms = {lnm["name"]: lnm for lnm in await alice.list_lnm()}
    assert lnms["lnm1"]["connected"] is True      # the LNM itself is fine
    # Operations fail clearly meanwhile.
    result = await alice.pause([victims[0]])
    assert result["done"] == [] and result["failed"][0]["name"] == victims[0]

    await threads.deferToThread(system.hosts["lnm1"].start, clean=False)
    # The test driver comes back empty (like a host that rebooted): the LNM
    # reconnects with backoff and finds the VMs gone.
    recovered = await until(lambda: all(s == states.MISSING
                                        for s in states_of(alice, victims).values()))
    report("libvirtd back -> LNM reconnected and rescanned", recovered)
    for name in victims:
        assert states.SHUTOFF not in seen.get(name, [])
    assert all(alice.vms[n]["state"] == states.RUN for n in names if n not in victims)
    # New VMs can be started there again.
    again = await alice.start(["hvnew"], lnms=["lnm1"])
    assert again["failed"] == [] and again["started"][0]["lnm"] == "lnm1"


def teardown_module(module):
    if MEASURED:
        print("\n[measured] summary:")
        for what, seconds in MEASURED.items():
            print(f"  {what}: {seconds:.2f} s")


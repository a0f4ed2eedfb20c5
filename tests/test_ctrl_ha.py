"""A standby controller (README, "A standby controller"), for real: two
usherctrl processes on one real PostgreSQL (tests/pgserver.py), clients over
real TLS on 127.0.0.1. The first to start is active with term 1, the other
answers Standby; kill -9 of the active one -> the standby takes over with a
higher term and serves; the active one losing the database (its connection
cut by a TCP proxy) -> it steps down and refuses commands, and a write with
its old term is refused by the fence. A real usherlnm (the test driver)
dialing the standby is refused with Standby. (LNMs following the active
controller and the LNM's term gate belong to the LNM side's tests.)"""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.protocols import portforward

from tests.e2e import sleep, wait_for
from usher import sandbox
from usher.client import UsherClient
from usher.controller.leadership import connect
from usher.controller.store import PgStateStore, StaleTerm
from usher.errors import Standby, Unavailable

# A bound on a hang only, never a measurement.
HANG = 60
CHECK_INTERVAL = 0.2
LOST_AFTER = 2.0


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ha-site")
    return sandbox.prepare(str(directory), lnms=1, domain="usher.test", user="alice",
                           rounds=4)


def ctrl_config(site, name, dsn):
    """The sandbox's controller configuration for controller ``name`` of
    the pair: its own ports and state directory, the HA database."""
    with open(site["configs"]["ctrl"], encoding="utf-8") as f:
        text = f.read()
    client_port, lnm_port = sandbox.free_port(), sandbox.free_port()
    text = re.sub(r"(?m)^client_port = .*$", f"client_port = {client_port}", text)
    text = re.sub(r"(?m)^lnm_port = .*$", f"lnm_port = {lnm_port}", text)
    metrics_port = sandbox.free_port()
    text = re.sub(r"(?m)^metrics_port = .*$", f"metrics_port = {metrics_port}", text)
    text = re.sub(r"(?m)^state_dir = .*$", f"state_dir = {site['dir']}/{name}-state", text)
    text = text.replace("[ctrl]\n", f"[ctrl]\nha_database = {dsn}\nha_name = {name}\n"
                        f"ha_check_interval = {CHECK_INTERVAL}\n"
                        f"ha_lost_after = {LOST_AFTER}\n", 1)
    path = os.path.join(site["dir"], f"{name}.config")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path, client_port, lnm_port, metrics_port


class Controller:
    def __init__(self, site, name, dsn):
        self.site, self.name = site, name
        self.config, self.port, self.lnm_port, self.metrics_port = ctrl_config(site, name,
                                                                                dsn)
        self.log = os.path.join(site["dir"], f"{name}.log")
        self.process = None

    def start(self):
        ready = os.path.join(self.site["dir"], f"{self.name}.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "usher.controller.main", "--isolated", "--config",
             self.config, "--ready-file", ready], stdin=subprocess.DEVNULL,
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        self.ready = ready
        return self

    async def started(self):
        await wait_for(lambda: os.path.exists(self.ready) or self.process.poll() is not None,
                       timeout=HANG)
        assert self.process.poll() is None, self.output()

    def output(self):
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def metrics(self):
        """-> Deferred: does its /metrics answer?"""
        def get():
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
                    return r.status == 200
            except OSError:
                return False
        return threads.deferToThread(get)

    def kill(self, sig=signal.SIGKILL):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=HANG)

    async def login(self):
        """-> a logged-in UsherClient; raises what the login raised."""
        client = UsherClient(reactor, "127.0.0.1", self.port, ca_file=self.site["ca_file"],
                             tls_name="localhost", username=self.site["user"],
                             password=self.site["password"], timeout=10)
        try:
            await client.connect()
        except BaseException:
            await client.disconnect()
            raise
        return client


def start_lnm(site, port):
    with open(site["configs"]["lnm1"], encoding="utf-8") as f:
        text = f.read()
    assert "test_host = yes" in text
    text = re.sub(r"(?m)^controller_port = .*$", f"controller_port = {port}", text)
    path = os.path.join(site["dir"], "lnm-standby.config")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return subprocess.Popen([sys.executable, "-m", "usher.lnm.main", "--isolated", "--config",
                             path], stdin=subprocess.DEVNULL,
                            stdout=open(os.path.join(site["dir"], "lnm-standby.log"), "w"),
                            stderr=subprocess.STDOUT)


def lnm_output(site):
    with open(os.path.join(site["dir"], "lnm-standby.log"), encoding="utf-8",
              errors="replace") as f:
        return f.read()


async def login_outcome(ctrl):
    """-> "active" (logged in and listed), "standby" or "unreachable"."""
    try:
        client = await ctrl.login()
    except Standby:
        return "standby"
    except (Unavailable, OSError, ConnectionError):
        return "unreachable"
    try:
        await client.list()
    finally:
        await client.disconnect()
    return "active"


def leadership(postgres, database):
    out = postgres.psql(database, "SELECT term, holder FROM usher_leadership").strip()
    term, holder = out.split("|")
    return int(term), holder


class _Cuttable(portforward.ProxyServer):
    def connectionMade(self):
        self.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.live.discard(self)
        super().connectionLost(reason)


class CuttableProxy:
    """127.0.0.1:port -> the PostgreSQL server; ``cut()`` drops every
    connection and refuses new ones (a partition)."""

    def __init__(self, port):
        self.factory = portforward.ProxyFactory("127.0.0.1", port)
        self.factory.protocol = _Cuttable
        self.factory.live = set()
        self.listener = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listener.getHost().port

    async def cut(self):
        await self.listener.stopListening()
        for server in list(self.factory.live):
            server.transport.abortConnection()
            if server.peer is not None:
                server.peer.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_active_standby_failover_and_database_loss(site, postgres):
    database = "ctrl_ha"
    postgres.create_database(database)
    direct = f"host=127.0.0.1 port={postgres.port} dbname={database} user=usher"
    secret = "s3cret-never-logged"        # trust auth: ignored by the server
    proxy = CuttableProxy(postgres.port)
    via_proxy = f"host=127.0.0.1 port={proxy.port} dbname={database} user=usher"
    a = Controller(site, "ctrl-a", f"{direct} password={secret}")
    b = Controller(site, "ctrl-b", via_proxy)
    try:
        # (a) the first one to start is active, term 1; the other is a standby.
        a.start()
        await a.started()
        await wait_for(lambda: os.path.exists(a.ready), timeout=HANG)
        assert await _eventually(a, "active"), a.output()
        assert leadership(postgres, database) == (1, "ctrl-a")
        b.start()
        await b.started()
        refusals = []

        async def refused():
            try:
                client = await b.login()
            except Standby as e:
                refusals.append(str(e))
                return "ctrl-a" in str(e)
            await client.disconnect()
            raise AssertionError("the standby let a client log in")
        deadline = time.monotonic() + HANG
        while not await refused() and time.monotonic() < deadline:
            await sleep(0.1)
        assert refusals[-1] == "standby controller ctrl-b; the active one is ctrl-a"
        assert await a.metrics() and not await b.metrics()   # served while active
        # A real LNM (the test driver) dialing the standby is refused too.
        lnm = start_lnm(site, b.lnm_port)
        try:
            await wait_for(lambda: "standby controller ctrl-b" in lnm_output(site), timeout=HANG)
        finally:
            lnm.kill()
            lnm.wait(timeout=HANG)
        assert secret not in a.output() and "password=***" in a.output()

        # (b) kill -9 the active one: the standby takes over with a higher
        # term and serves (the time is reported, never asserted).
        killed = time.monotonic()
        a.kill()
        assert await _eventually(b, "active"), b.output()
        took = time.monotonic() - killed
        term, holder = leadership(postgres, database)
        assert (term, holder) == (2, "ctrl-b")
        print(f"\nfailover: the standby served a login and list {took:.2f} s after "
              "kill -9 of the active controller (no LNMs)")
        assert "HA: ctrl-b is active (term 2)" in b.output()
        assert await b.metrics()

        # (c) the active one loses the database: it steps down within
        # ha_lost_after (+ a margin), refusing commands as a standby, and the
        # other one (started again) takes over with term 3.
        await proxy.cut()
        cut = time.monotonic()
        assert await _eventually(b, "standby", timeout=LOST_AFTER + 10), b.output()
        print(f"database lost: the active controller stepped down after "
              f"{time.monotonic() - cut:.2f} s (ha_lost_after {LOST_AFTER:g} s)")
        assert "steps down from term 2" in b.output()
        assert not await b.metrics()
        a.start()
        await a.started()
        assert await _eventually(a, "active"), a.output()
        assert leadership(postgres, database) == (3, "ctrl-a")
        # A write with the deposed term is fenced off.
        run = threads.deferToThread
        stale = PgStateStore(lambda: connect(direct), run, term=lambda: 2)
        with pytest.raises(StaleTerm):
            await stale.save("lnms", {"node1": {"hostname": "stale"}})
        await stale.close()
        assert b.process.poll() is None        # stood by, still running
    finally:
        for c in (a, b):
            c.kill(signal.SIGTERM)


async def _eventually(ctrl, wanted, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ctrl.process.poll() is not None:
            return False
        if await login_outcome(ctrl) == wanted:
            return True
        await sleep(0.1)
    return False


@pytest.mark.parametrize("setting, problem", [
    ("ha_database = host=db1 port=5432 dbname=usher pass=x'",
     "[ctrl] ha_database: is not a libpq connection string"),
    ("ha_lost_after = -1", "[ctrl] ha_lost_after: '-1' must be greater than 0"),
    ("ha_check_interval = 9\nha_database = host=127.0.0.1",
     "[ctrl] ha_lost_after (5 s) must be longer than ha_check_interval (9 s)"),
])
def test_an_invalid_ha_setting_exits_2_naming_file_line_and_key(site, setting, problem):
    path = os.path.join(site["dir"], "bad-ha.config")
    with open(site["configs"]["ctrl"], encoding="utf-8") as f:
        text = f.read().replace("[ctrl]\n", f"[ctrl]\n{setting}\n", 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    done = subprocess.run([sys.executable, "-m", "usher.controller.main", "--isolated",
                           "--config", path], capture_output=True, text=True, timeout=HANG,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stdout + done.stderr
    assert problem in done.stderr
    assert "pass=x" not in done.stderr
    if "ha_check_interval" not in setting:
        assert f"{path}:3:" in done.stderr      # a comment line comes first

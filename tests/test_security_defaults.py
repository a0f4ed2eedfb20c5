"""Hole 11: defaults that do not invite abuse.

With the settings a site gets without saying (a sandbox of processes, PB
over TLS): one ordinary user cannot take every host (the controller
registers ``limits`` on starts with per-user quotas), a request of more than
``max_request_vms`` VMs or with oversized args is refused whole, and every
listening port of the controller and the LNM is on loopback unless the
site names an interface. Each refusal leaves the system as it was, and
another user is answered meanwhile.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from bench.system import BENCH_LIMITS, BenchSystem
from usher import settings
from usher.config import load_config, load_plugin_config
from usher.controller.commands import MAX_ARG_LEN, MAX_ARGS, MAX_ARGS_BYTES
from usher.controller.commands import check_args as _check_args
from usher.controller.core import Controller
from usher.errors import InvalidRequest
from usher.plugins import limits as limits_plugin

from tests.e2e import RunningSandbox
from tests.grid import Grid

DOMAIN = "usher.test"


@pytest_twisted.async_yield_fixture(scope="module")
async def system(tmp_path_factory):
    box = RunningSandbox(tmp_path_factory.mktemp("sandbox"), lnms=3)
    await box.start()
    for user in ("bob", "carol", "mallory"):
        box.add_user(user, f"{user}-secret")
    yield box
    await box.stop()


async def _user(system, name):
    return await system.connected_client(name, f"{name}-secret")


async def _snapshot(admin, *users):
    """What a refused request must not change: VMs per LNM, and the users' VMs."""
    hosts = {h["name"]: h["vms"] for h in await admin.list_lnm()}
    owned = {}
    for client in users:
        owned[client.user] = sorted(r["name"] for r in await client.list(remote=True)
                                    if r["owner"] == client.user)
    return hosts, owned


async def _refused_meanwhile(attack, bystander):
    """Run ``attack`` (a Deferred or coroutine) with a bystander's remote
    list in flight: -> (the attack's InvalidRequest, the bystander's answer)."""
    outcome, listed = await defer.DeferredList(
        [defer.ensureDeferred(attack), bystander.list(remote=True)], consumeErrors=True)
    assert not outcome[0], "the attack was accepted"
    assert listed[0], listed[1]
    outcome[1].trap(InvalidRequest)
    return outcome[1].value, listed[1]


# --- args per VM ------------------------------------------------------------------------

def test_args_are_bounded_in_number_and_total_size():
    assert _check_args({f"a{i}": "x" * 100 for i in range(MAX_ARGS)})
    with pytest.raises(InvalidRequest, match=f"at most {MAX_ARGS} request arguments"):
        _check_args({f"a{i}": "x" for i in range(MAX_ARGS + 1)})
    with pytest.raises(InvalidRequest, match=f"larger than {MAX_ARGS_BYTES} bytes"):
        _check_args({f"a{i}": "x" * MAX_ARG_LEN for i in range(5)})
    # Characters that take several bytes count as bytes.
    with pytest.raises(InvalidRequest, match="larger than"):
        _check_args({f"a{i}": "\u20ac" * 1400 for i in range(4)})
    assert _check_args({"a": "x" * MAX_ARG_LEN, "b": 1, "c": None, "d": True})


@pytest_twisted.ensureDeferred
async def test_sixty_args_of_4_kib_are_refused_on_every_request(system):
    mallory, carol = await _user(system, "mallory"), await _user(system, "carol")
    admin = await system.connected_client()
    await carol.start(["keep"])
    before = await _snapshot(admin, mallory, carol)
    huge = {f"arg{i}": "x" * 4096 for i in range(60)}
    error, listed = await _refused_meanwhile(mallory.start(["big"], args=huge), carol)
    assert f"at most {MAX_ARGS} request arguments (got 60)" in str(error)
    assert [r["name"] for r in listed if r["owner"] == "carol"] == [f"keep.carol.{DOMAIN}"]
    # Under the count, over the size; and the other requests that carry args.
    wide = {f"arg{i}": "x" * 4096 for i in range(20)}
    error, _ = await _refused_meanwhile(mallory.start(["big"], args=wide), carol)
    assert f"larger than {MAX_ARGS_BYTES} bytes" in str(error)
    await mallory.start(["own"])
    own = {"names": [f"own.mallory.{DOMAIN}"]}
    for method, args in (("op_on", ("pause", own, huge)), ("migrate", (own, [], wide))):
        error, _ = await _refused_meanwhile(mallory._remote(method, *args), carol)
        assert "request arguments" in str(error)
    await mallory.delete([f"own.mallory.{DOMAIN}"], {"force": True})
    assert await _snapshot(admin, mallory, carol) == before


# --- VMs per request --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_over_large_request_is_refused_whole(system):
    mallory, carol = await _user(system, "mallory"), await _user(system, "carol")
    admin = await system.connected_client()
    before = await _snapshot(admin, mallory, carol)
    for client, names, args in ((mallory, [], {"cluster": "flood", "count": 1001}),
                                (mallory, [f"n{i}" for i in range(1001)], {}),
                                (mallory, ["[1-1001].flood"], {}),
                                (admin, [], {"cluster": "flood", "count": 1001})):
        error, listed = await _refused_meanwhile(client._remote("start", names, [], args),
                                                 carol)
        assert "at most 1000 VMs per request" in str(error)
        assert listed is not None
    assert await _snapshot(admin, mallory, carol) == before


@pytest_twisted.ensureDeferred
async def test_a_start_of_1000_vms_still_works_with_the_defaults(tmp_path):
    grid = Grid(reactor, tmp_path, lnms=2, cpus=64, memory_mib=65536)
    await grid.start()
    try:
        assert grid.controller.max_request_vms == 1000
        result = await grid.controller.start("root", True, [], [],
                                             {"cluster": "thousand", "count": 1000,
                                              "memory_mib": 16})
        assert result["failed"] == [] and len(result["started"]) == 1000
    finally:
        await grid.stop()


# --- per-user quota ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_one_user_cannot_take_every_host_with_the_defaults(system):
    admin = await system.connected_client()
    registered = [(r["plugin"], r["event"]) for r in (await admin.plugins())["registered"]]
    assert ("limits", "start_request") in registered
    bob, carol = await _user(system, "bob"), await _user(system, "carol")
    most = limits_plugin.DEFAULT_QUOTAS["max_vms_per_user"]

    result, listed = await defer.gatherResults([
        bob.start(cluster="grab", count=1000), carol.list(remote=True)])
    assert len(result["started"]) == most and len(result["failed"]) == 1000 - most
    assert result["failed"][0]["error"] == (
        f"over the limit: at most {most} VMs per user (bob has {most})")
    assert result["notes"] == [f"limits: {most} of 1000 VMs allowed; {1000 - most} left out "
                               f"(at most {most} VMs per user (bob has {most}))"]
    assert listed is not None                       # carol was answered meanwhile
    # Memory: bob's VMs may not take the hosts' memory either.
    await bob.delete([s["name"] for s in result["started"][:10]], {"force": True})
    big = await bob.start(cluster="huge", count=10, args={"memory_mib": 30000})
    assert len(big["started"]) == 0
    assert "at most 32768 MiB of memory per user" in big["failed"][0]["error"]
    # Every host still takes another user's VMs.
    for lnm in system.description["lnms"]:
        started = await carol.start([f"on-{lnm}"], lnms=[lnm])
        assert [s["lnm"] for s in started["started"]] == [lnm], started
    hosts = await admin.list_lnm()
    assert all(h["connected"] for h in hosts)


# --- listening interfaces ------------------------------------------------------------------

def test_every_port_listens_on_loopback_unless_the_site_names_an_interface(tmp_path):
    home = str(tmp_path)
    ctrl = load_config(settings.CTRL, [], env={}, home=home, isolated=True)["ctrl"]
    lnm = load_config(settings.LNM, [], env={}, home=home, isolated=True)["lnm"]
    plusher = load_config(settings.PLUSHER, [], env={}, home=home, isolated=True)["plusher"]
    assert [ctrl["client_interface"], ctrl["lnm_interface"], ctrl["metrics_interface"],
            lnm["recovery_interface"], plusher["interface"]] == ["127.0.0.1"] * 5
    assert ctrl["max_request_vms"] == 1000
    assert Controller(domain=DOMAIN, clock=reactor).max_request_vms == 1000


def test_the_sandbox_binds_loopback_everywhere(system):
    configs = system.description["configs"]
    seen = {}
    for component, path in configs.items():
        with open(path) as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip().endswith("interface"):
                    seen[(component, key.strip())] = value.strip()
    assert set(seen.values()) == {"127.0.0.1"}
    assert {key for _component, key in seen} == {"client_interface", "lnm_interface",
                                                 "metrics_interface", "recovery_interface"}


def test_the_benchmark_raises_its_own_limits_explicitly(tmp_path):
    bench = BenchSystem(reactor, str(tmp_path), lnms=1)
    bench.prepare()
    ctrl = load_config(settings.CTRL, [bench.ctrl_config], isolated=True)["ctrl"]
    assert ctrl["max_request_vms"] == 10000
    limits = ctrl["plugins"]["limits"]
    assert limits["events"] == ["start_request"]
    quotas = load_plugin_config(limits_plugin.CONFIG_SPEC, limits["config"])
    assert {key: quotas[key] for key in BENCH_LIMITS} == dict.fromkeys(BENCH_LIMITS, 0)
    # The rest of the chain is the default one.
    assert {name: dict(reg, config=None) for name, reg in ctrl["plugins"].items()} == \
        settings.default_plugin_registrations()

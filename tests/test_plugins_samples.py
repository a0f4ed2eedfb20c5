"""Every shipped plugin has a sample configuration that documents each option
and loads as written; the capacity accounting shared by placement plugins,
in isolation."""

import importlib
import pkgutil
from pathlib import Path

import pytest
from twisted.internet import task

from usher import states
from usher.config import load_plugin_config, parse_spec
from usher.controller.capacity import CapacityPolicy, Demand, Ledger, host_load, vm_cpus
from usher.controller.events import EventChains
from usher.controller.plugins import PluginRegistry, _with_common_options
from usher.controller.state import GlobalState, LNMInfo

SAMPLES = Path(__file__).resolve().parent.parent / "etc" / "plugins"
SHIPPED = sorted(m.name for m in pkgutil.iter_modules(
    importlib.import_module("usher.plugins").__path__) if not m.name.startswith("_"))


def test_every_shipped_plugin_has_a_sample_configuration():
    assert SHIPPED == sorted(p.stem for p in SAMPLES.glob("*.config"))
    assert {"open_authz", "limits", "roundrobin", "leastloaded", "pack", "spread",
            "rebalancer"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_sample_configuration_loads_and_documents_every_option(name):
    module = importlib.import_module(f"usher.plugins.{name}")
    sample = SAMPLES / f"{name}.config"
    loaded = load_plugin_config(_with_common_options(getattr(module, "CONFIG_SPEC", None)),
                                str(sample))
    defaults = load_plugin_config(_with_common_options(getattr(module, "CONFIG_SPEC", None)),
                                  None)
    assert loaded == defaults, "the sample shows every option with its default value"
    lines = sample.read_text(encoding="utf-8").splitlines()
    spec = parse_spec(getattr(module, "CONFIG_SPEC", ""))
    options = [key for key, check in spec.items() if isinstance(check, str)] + ["order",
                                                                                "timeout"]
    for option in options:
        index = next((i for i, line in enumerate(lines) if line.startswith(f"{option} =")),
                     None)
        assert index is not None, f"{option} missing from {sample.name}"
        above = [line for line in lines[max(0, index - 8):index] if line.startswith("# ")]
        assert above, f"{option} has no comment in {sample.name}"
    for section in (key for key, check in spec.items() if not isinstance(check, str)):
        assert f"[{section}]" in lines, f"section [{section}] missing from {sample.name}"
    assert module.__doc__ and len(module.__doc__.splitlines()[0]) < 100


def test_plugins_describe_themselves_by_their_docstrings():
    about = PluginRegistry(EventChains(task.Clock()), api=None).describe()["about"]
    assert about["pack"].startswith("Pack placement:")
    assert about["limits"].startswith("Limits:")
    assert all(about[name] for name in SHIPPED)


# -- capacity ---------------------------------------------------------------------------

def state_with(hosts, vms=()):
    state = GlobalState("usher.test")
    for name, (cpus, memory) in hosts.items():
        state.lnms[name] = LNMInfo(name, {"cpus": cpus, "memory_mib": memory}, handle=object())
    for name, host, memory, vcpus, vm_state, args in vms:
        state.add(state.new_record(name, state=vm_state, lnm=host, memory_mib=memory,
                                   vcpus=vcpus, args=args))
    return state


def test_only_vms_holding_resources_count():
    state = state_with({"h1": (4, 4096)}, [
        ("1.a.alice.usher.test", "h1", 1024, 1, states.RUN, {}),
        ("2.a.alice.usher.test", "h1", 1024, 1, states.PAUSED, {}),
        ("3.a.alice.usher.test", "h1", 1024, 1, states.SHUTOFF, {}),
        ("4.a.alice.usher.test", "h1", 1024, 1, states.HIBERNATED, {}),
        ("5.a.alice.usher.test", "h1", 512, 2, states.RUN, {"guaranteed": "yes"})])
    ledger = Ledger(state, CapacityPolicy({}))
    host = ledger.hosts["h1"]
    assert (host.memory, host.vcpus, host.guaranteed_memory, host.guaranteed_vcpus,
            host.vms) == (2048, 2, 512, 2, 3)
    assert host.clusters[("alice", "a")] == 3
    assert ledger.refusal("h1", Demand(1536, 1)) is None
    assert ledger.refusal("h1", Demand(1537, 1)) == (
        "memory: needs 1537 MiB, 1536 MiB uncommitted (VMs' configured memory commits 2560 "
        "of 4096 MiB)")
    assert ledger.refusal("gone", Demand(1, 1)) == "not connected"


def test_a_vm_being_migrated_counts_on_both_hosts():
    state = state_with({"h1": (4, 4096), "h2": (4, 4096), "h3": (4, 4096)}, [
        ("1.a.alice.usher.test", "h1", 1024, 1, states.MIGRATING, {})])
    state.incoming["1.a.alice.usher.test"] = "h2"
    state.incoming["gone.a.alice.usher.test"] = "h3"      # no record: counts nowhere
    ledger = Ledger(state, CapacityPolicy({}))
    assert [ledger.hosts[h].memory for h in ("h1", "h2", "h3")] == [1024, 1024, 0]
    ignoring = Ledger(state, CapacityPolicy({}), ignore=["1.a.alice.usher.test"])
    assert [ignoring.hosts[h].memory for h in ("h1", "h2")] == [0, 0]


def test_per_host_rules_and_vm_counts():
    state = state_with({"h1": (2, 2048), "h2": (2, 2048)}, [
        ("1.a.alice.usher.test", "h1", 256, 1, states.RUN, {})])
    policy = CapacityPolicy({"max_vms_per_host": 2, "reserved_cpus": 1,
                             "hosts": {"h2": {"reserved_cpus": 2, "max_vms_per_host": None,
                                              "memory_overcommit": None,
                                              "cpu_overcommit": None,
                                              "reserved_memory_mib": None}}})
    ledger = Ledger(state, policy)
    ledger.commit("h1", Demand(256, 1))
    assert ledger.refusal("h1", Demand(256, 1)) == \
        "already runs 2 VMs (at most 2 per host)"
    assert ledger.refusal("h2", Demand(256, 1)) == \
        "nothing left after the host's reservation (2 CPUs, 0 MiB reserved)"
    ledger.release("h1", Demand(256, 1))
    assert ledger.refusal("h1", Demand(256, 17)) == (
        "CPUs: needs 17 vCPUs, 15 uncommitted (VMs' vCPUs commit 0.1 of 2 CPUs, 1 reserved "
        "for the host, overcommit x16)")


def test_load_accessors_normalise_units_and_tolerate_no_monitoring():
    class Figures:
        def lnm_figure(self, lnm, figure, window):
            return {"h1": 75.0}.get(lnm)

        def vm_figure(self, vm, figure, window):
            return {"vm": 150.0}.get(vm)

        def lnm_load(self, lnm):
            return type("Load", (), {"age": 500})()

        def vm_load(self, vm):
            return type("Load", (), {"age": 5})()

    api = type("API", (), {"monitoring": Figures()})()
    assert host_load(api, "h1") == 0.75 and host_load(api, "h2") is None
    assert host_load(api, "h1", max_age=100) is None      # stale
    assert vm_cpus(api, "vm") == 1.5 and vm_cpus(api, "vm", max_age=100) == 1.5
    assert host_load(object(), "h1") is None and vm_cpus(object(), "vm") is None

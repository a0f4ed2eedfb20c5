"""Holds on hosts: persisted with the known LNMs, refused by placement with
their reason, told to plugins as lnm_hold_changed."""

import pytest

from usher.controller.capacity import CapacityPolicy, Ledger
from usher.controller.core import Controller
from usher.controller.holds import HostHolds
from usher.controller.known_lnms import KnownLNMs
from usher.controller.state import LNMInfo
from usher.errors import InvalidRequest, NoSuchLNM
from twisted.internet import task


def known(tmp_path, *names):
    lnms = KnownLNMs(str(tmp_path / "lnms.json"))
    for name in names:
        lnms.remember(name, hostname=name)
    return lnms


def test_a_hold_survives_a_restart_and_its_release_too(tmp_path):
    holds = HostHolds(known(tmp_path, "lnm1", "lnm2"))
    holds.hold("lnm1", "maintenance", reason="new disks", by="root")
    again = HostHolds(KnownLNMs(str(tmp_path / "lnms.json")))
    assert again.get("lnm1", "maintenance") == {"reason": "new disks", "by": "root"}
    assert again.reason("lnm1") == "in maintenance: new disks"
    assert again.reason("lnm2") is None
    assert again.release("lnm1", "maintenance")
    assert not HostHolds(KnownLNMs(str(tmp_path / "lnms.json"))).held("lnm1")


def test_an_lnm_reattaching_keeps_its_holds(tmp_path):
    lnms = known(tmp_path, "lnm1")
    HostHolds(lnms).hold("lnm1", "fenced", restarted=["a"])
    lnms.remember("lnm1", hostname="elsewhere", recovery_port=7)
    assert HostHolds(KnownLNMs(str(tmp_path / "lnms.json"))).get("lnm1", "fenced") == {
        "restarted": ["a"]}


def test_unknown_lnms_and_bad_kinds_are_refused(tmp_path):
    holds = HostHolds(known(tmp_path, "lnm1"))
    with pytest.raises(NoSuchLNM):
        holds.hold("nosuch", "maintenance")
    with pytest.raises(InvalidRequest):
        holds.hold("lnm1", "Bad Kind")
    assert holds.update("lnm1", "maintenance", reason="x") is None
    assert not holds.release("lnm1", "maintenance")


def test_the_ledger_refuses_a_held_host_with_the_reason():
    controller = Controller(domain="usher.test", clock=task.Clock())
    for name in ("lnm1", "lnm2"):
        controller.state.lnms[name] = LNMInfo(name, {"cpus": 8, "memory_mib": 8192},
                                              handle=object())
    controller.holds.hold("lnm1", "maintenance", reason="firmware")
    ledger = Ledger(controller.state, CapacityPolicy())
    demand = ledger.demand({"memory_mib": 256, "vcpus": 1})
    assert ledger.refusal("lnm1", demand) == "in maintenance: firmware"
    assert ledger.refusal("lnm2", demand) is None
    assert not ledger.placeable("lnm1") and ledger.placeable("lnm2")
    wire = controller.list_lnm("root", True)
    assert [lnm["holds"] for lnm in wire] == [{"maintenance": {"reason": "firmware"}}, {}]


def test_plugins_hear_of_each_hold_change():
    controller = Controller(domain="usher.test", clock=task.Clock())
    heard = []
    controller.chains.notify = heard.append
    controller.holds.hold("lnm1", "maintenance", reason="r")
    controller.holds.release("lnm1", "maintenance")
    assert [(e.name, e.lnm, e.kind, e.held) for e in heard] == [
        ("lnm_hold_changed", "lnm1", "maintenance", True),
        ("lnm_hold_changed", "lnm1", "maintenance", False)]

"""Property-based tests (hypothesis) of what an LNM may send: the validators
of usher.controller.lnm_input accept every valid entry and refuse anything
else with InvalidRequest (never another exception, never storing anything);
and the report path keeps GlobalState consistent (its indexes match its
records, no VM changes host, acknowledgments cover the LNM's own VMs) under
random sequences of attaches, reports, garbage and detaches."""

import copy
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task

from usher import records, states
from usher.controller import lnm_input
from usher.controller.commands import LNM_FIELDS
from usher.controller.core import Controller
from usher.controller.lnm_input import LNMLimits
from usher.controller.monitoring import Monitoring
from usher.controller.recovery import Recovery
from usher.controller.state import GlobalState, LNMInfo, check_fields
from usher.errors import InvalidRequest
from usher.protocol import PROTOCOL_VERSION

from test_lnm_node import result_of

from tests.fakes import FakeLNMHandle

DOMAIN = "usher.test"
LIMITS = LNMLimits(max_report_changes=8, max_vms=12, max_unmanaged=4)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
RUNS = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies ------------------------------------------------------------------------

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
host_labels = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,6}[A-Za-z0-9_])?",
                            fullmatch=True)
owners = st.sampled_from(["alice", "bob", "carol"])
managed_names = st.builds(lambda a, b, owner: f"{a}.{b}.{owner}.{DOMAIN}", labels, labels,
                          owners)
unmanaged_names = st.builds(lambda a, b: f"{a}.{b}", host_labels,
                            st.sampled_from(["example", "example.org", "lab"]))
names = st.one_of(managed_names, unmanaged_names)
uuids = st.uuids().map(str)
metadata = st.fixed_dictionaries({}, optional={"owner": owners, "cluster": labels})


def entries(name_strategy=names, reported=lnm_input.REPORTED_STATES):
    return st.fixed_dictionaries(
        {"name": name_strategy,
         "state": st.one_of(st.none(), st.sampled_from(sorted(reported)))},
        optional={"uuid": st.one_of(st.none(), uuids),
                  "memory_mib": st.one_of(st.none(), st.integers(0, lnm_input.MAX_MEMORY_MIB)),
                  "vcpus": st.one_of(st.none(), st.integers(0, lnm_input.MAX_CPUS)),
                  "metadata": st.one_of(st.none(), metadata),
                  "busy": st.booleans(), "retained": st.booleans()})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16)
FIELDS = ("name", "state", "uuid", "memory_mib", "vcpus", "metadata", "busy", "retained",
          "owner", "cluster", "hostname", "cpus", "protocol", "recovery_port", "info",
          "error", "kind")
garbage_dicts = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values,
                                max_size=8)
garbage = st.one_of(json_values, garbage_dicts)
garbage_chunks = st.one_of(
    json_values,
    st.lists(st.one_of(st.text(max_size=40), json_values.map(json.dumps),
                       st.lists(garbage_dicts, max_size=3).map(json.dumps),
                       st.integers(), st.binary(max_size=20)), max_size=4))


def refused_or_clean(check, *args):
    """-> the checker's result, or None when it refused with InvalidRequest;
    any other exception fails the test."""
    try:
        return check(*args)
    except InvalidRequest:
        return None


# -- the validators ----------------------------------------------------------------------

@FAST
@given(entries())
def test_every_valid_entry_is_accepted_as_it_is(entry):
    clean = lnm_input.check_domain(entry, DOMAIN)
    assert clean["name"] == entry["name"] and clean["state"] == entry["state"]
    for key in ("memory_mib", "vcpus"):
        assert clean[key] == entry.get(key)
    assert clean["uuid"] == (entry.get("uuid") or None)
    meta = entry.get("metadata") or {}
    assert clean["metadata"] == {"owner": meta.get("owner"), "cluster": meta.get("cluster")}
    assert clean.get("busy", False) == entry.get("busy", False)
    assert lnm_input.check_domain(clean, DOMAIN) == clean     # idempotent


@FAST
@given(garbage)
def test_garbage_entries_are_refused_or_come_out_clean(entry):
    clean = refused_or_clean(lnm_input.check_domain, entry, DOMAIN)
    if clean is None:
        return
    assert set(clean) <= {"name", "state", "uuid", "memory_mib", "vcpus", "metadata", "busy",
                          "retained"}
    assert clean["state"] is None or clean["state"] in lnm_input.REPORTED_STATES
    for key, limit in (("memory_mib", lnm_input.MAX_MEMORY_MIB),
                       ("vcpus", lnm_input.MAX_CPUS)):
        value = clean[key]
        assert value is None or (type(value) is int and 0 <= value <= limit)
    assert lnm_input.check_domain(clean, DOMAIN) == clean


@FAST
@given(st.lists(entries(), max_size=LIMITS.max_report_changes))
def test_valid_reports_are_accepted(changes):
    unique = list({c["name"]: c for c in changes}.values())
    chunks = records.encode_chunks(unique)
    checked = lnm_input.check_report(chunks, DOMAIN, LIMITS)
    assert [c["name"] for c in checked] == [c["name"] for c in unique]
    assert lnm_input.check_inventory(chunks, DOMAIN, LIMITS) == checked


@FAST
@given(garbage_chunks)
def test_garbage_reports_and_inventories_are_refused_or_clean(chunks):
    for check in (lnm_input.check_report, lnm_input.check_inventory):
        checked = refused_or_clean(check, chunks, DOMAIN, LIMITS)
        assert checked is None or all(lnm_input.check_domain(c, DOMAIN) == c
                                      for c in checked)
    vms = refused_or_clean(lnm_input.check_status_size, chunks, LIMITS)
    assert vms is None or len(vms) <= LIMITS.max_vms


@settings(FAST, max_examples=30)
@given(st.lists(entries(), min_size=LIMITS.max_report_changes + 1,
                max_size=LIMITS.max_report_changes + 3, unique_by=lambda e: e["name"]))
def test_a_report_over_the_cap_is_refused_whole(changes):
    assert refused_or_clean(lnm_input.check_report, records.encode_chunks(changes), DOMAIN,
                            LIMITS) is None


node_infos = st.fixed_dictionaries(
    {"hostname": st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
     "cpus": st.integers(0, lnm_input.MAX_CPUS),
     "memory_mib": st.integers(0, lnm_input.MAX_MEMORY_MIB)},
    optional={"driver": st.sampled_from(["Test", "QEMU"]), "live_migration": st.booleans(),
              "migration_uri": st.one_of(st.none(), st.just("qemu+tcp://h/system")),
              "model": st.just("x86_64"), "uri": st.just("test:///default"),
              "extra": json_values})


@FAST
@given(node_infos)
def test_valid_node_information_is_accepted(info):
    clean = lnm_input.check_node_info(info)
    assert (clean["cpus"], clean["memory_mib"]) == (info["cpus"], info["memory_mib"])
    assert "extra" not in clean


@FAST
@given(garbage)
def test_garbage_node_information_hello_and_answers_are_refused_or_clean(value):
    info = refused_or_clean(lnm_input.check_node_info, value)
    if info is not None:
        for key, limit in (("cpus", lnm_input.MAX_CPUS),
                           ("memory_mib", lnm_input.MAX_MEMORY_MIB)):
            assert info[key] is None or (type(info[key]) is int and 0 <= info[key] <= limit)
        assert isinstance(info["live_migration"], bool)
    hello = refused_or_clean(lnm_input.check_hello, value, PROTOCOL_VERSION)
    if hello is not None:
        assert hello["protocol"] == PROTOCOL_VERSION
        assert hello["recovery_port"] is None or 1 <= hello["recovery_port"] <= 65535
        assert isinstance(hello["destroy_keeps"], bool)
    answer = refused_or_clean(lnm_input.check_domain_info, value, "a.b")
    if answer is not None:
        assert answer["name"] == "a.b"
        assert answer["state"] is None or answer["state"] in states.ALL_STATES
    refused_or_clean(lnm_input.check_start_outcome, value)
    refused_or_clean(lnm_input.check_metadata, value)


def _figure_lists():
    finite = st.floats(0, lnm_input.MAX_FIGURE)
    return st.one_of(st.none(), st.lists(finite, min_size=3, max_size=3))


@FAST
@given(st.one_of(garbage_dicts, st.fixed_dictionaries({}, optional={
    "cpu": _figure_lists(), "memory_used": _figure_lists(), "vms": st.integers(0, 100),
    "free_memory_mib": st.integers(0, 1000), "source": st.just("libvirt")})),
    st.lists(st.one_of(garbage_dicts, st.fixed_dictionaries(
        {"name": names}, optional={"cpu": _figure_lists(), "source": st.just("libvirt")})),
        max_size=4))
def test_status_reports_are_taken_whole_or_refused_changing_nothing(node, vms):
    state = GlobalState(DOMAIN)
    monitoring = Monitoring(state, task.Clock())
    monitoring.report("lnm1", {"cpu": [1.0, 1.0, 1.0]}, [])
    before = monitoring.lnm_status("lnm1")
    try:
        monitoring.report("lnm1", node, vms)
    except InvalidRequest:
        assert monitoring.lnm_status("lnm1") == before
        return
    status = monitoring.lnm_status("lnm1")
    for figure in ("cpu", "memory_used"):
        values = status.get(figure)
        assert values is None or all(0 <= v <= lnm_input.MAX_FIGURE and not math.isnan(v)
                                     for v in values)


# -- the report path ----------------------------------------------------------------------

LNMS = ("lnm1", "lnm2", "lnm3")
pool = st.sampled_from([f"{i}.web.{owner}.{DOMAIN}" for i in range(4)
                        for owner in ("alice", "bob")]
                       + [f"stray{i}.example.org" for i in range(6)])
pool_entries = entries(pool)
steps = st.one_of(
    st.tuples(st.just("report"), st.sampled_from(LNMS),
              st.lists(pool_entries, max_size=LIMITS.max_report_changes + 2)),
    st.tuples(st.just("garbage"), st.sampled_from(LNMS), garbage_chunks),
    st.tuples(st.just("attach"), st.sampled_from(LNMS),
              st.lists(pool_entries, max_size=LIMITS.max_vms)),
    st.tuples(st.just("detach"), st.sampled_from(LNMS), st.none()))


def Handle(inventory):
    """An LNM handle whose inventory is the step's (everything it sends
    passes the PB boundary's checks first, as over PB)."""
    return FakeLNMHandle(
        inventory, node_info=lnm_input.check_node_info({"hostname": "h", "cpus": 8,
                                                       "memory_mib": 8192}),
        check=lambda chunks: lnm_input.check_inventory(chunks, DOMAIN, LIMITS))


def consistent(state):
    """GlobalState's indexes match its records."""
    clusters, owned, placed, strangers = {}, {}, {}, {}
    for name, rec in state.vms.items():
        check_fields(rec, name)
        assert rec["name"] == name and rec["managed"] is True
        clusters.setdefault((rec["owner"], rec["cluster"]), set()).add(name)
        owned.setdefault(rec["owner"], set()).add(name)
        if rec["lnm"] is not None:
            placed.setdefault(rec["lnm"], set()).add(name)
    for name, rec in state.unmanaged.items():
        check_fields(rec, name)
        assert rec["owner"] is None and rec["managed"] is False
        assert name not in state.vms
        strangers.setdefault(rec["lnm"], set()).add(name)
    assert state.clusters == clusters
    assert state._owned == owned
    for lnm, info in state.lnms.items():
        assert info.vms == placed.get(lnm, set())
        assert info.unmanaged == strangers.get(lnm, set())
        assert len(info.unmanaged) <= LIMITS.max_unmanaged
    assert set(placed) <= set(state.lnms) and set(strangers) <= set(state.lnms)


def snapshot(state):
    return (copy.deepcopy(state.vms), copy.deepcopy(state.unmanaged),
            {n: (v.connected, set(v.vms), set(v.unmanaged)) for n, v in state.lnms.items()})


def controller_with_vms(recovering):
    c = Controller(domain=DOMAIN, clock=task.Clock(), lnm_limits=LIMITS)
    if recovering:
        c.recovery = Recovery(["lnm1", "lnm2"], clock=c.clock, window=30)
        c.watch_lnms(c.recovery)
    for lnm in LNMS:
        c.state.lnms[lnm] = LNMInfo(lnm, {"cpus": 8, "memory_mib": 8192}, handle=Handle([]))
    if not recovering:
        # VMs the controller started: alice's on lnm1, bob's on lnm2.
        for owner, lnm in (("alice", "lnm1"), ("bob", "lnm2")):
            for i in (0, 1):
                c.state.add(c.state.new_record(f"{i}.web.{owner}.{DOMAIN}", state=states.RUN,
                                               lnm=lnm, memory_mib=256, vcpus=1))
    return c


@RUNS
@given(st.booleans(), st.lists(steps, max_size=12))
def test_random_reports_keep_the_state_consistent(recovering, script):
    c = controller_with_vms(recovering)
    homes = {name: rec["lnm"] for name, rec in c.state.vms.items()}
    started = set(homes)
    consistent(c.state)
    for kind, lnm, payload in script:
        before = snapshot(c.state)
        if kind == "detach":
            vmm = c.state.lnms[lnm]
            if vmm.connected:
                c.detach_lnm(lnm, vmm.handle)
        elif kind == "attach":
            handle = Handle(records.encode_chunks(list({e["name"]: e for e in payload}
                                                       .values())))
            try:
                result_of(c.attach_lnm(lnm, handle, {}))
            except InvalidRequest:
                assert snapshot(c.state) == before
            for sent in handle.received:
                assert set(sent) <= set(LNM_FIELDS)
                assert c.state.vms[sent["name"]]["lnm"] == lnm
        else:
            chunks = (records.encode_chunks(payload) if kind == "report" else payload)
            try:
                changes = lnm_input.check_report(chunks, DOMAIN, LIMITS)
            except InvalidRequest:
                assert snapshot(c.state) == before       # refused at the boundary
                continue
            if not c.state.lnms[lnm].connected:
                continue
            acks = c.lnm_report(lnm, changes)
            for ack in acks:
                assert set(ack) <= set(LNM_FIELDS)
                assert c.state.vms[ack["name"]]["lnm"] == lnm
        consistent(c.state)
        # No VM ever changed host: there was no migration.
        for name, rec in c.state.vms.items():
            assert homes.setdefault(name, rec["lnm"]) == rec["lnm"]
        # Only a trusted first inventory puts managed VMs in a namespace.
        if not recovering:
            assert set(c.state.vms) <= started


record_fields = st.fixed_dictionaries({}, optional={
    key: json_values for key in ("owner", "cluster", "state", "lnm", "memory_mib", "vcpus",
                                 "uuid", "args", "quarantined")})


@FAST
@given(record_fields, record_fields)
def test_global_state_changes_are_all_or_nothing(added, updated):
    state = GlobalState(DOMAIN)
    state.lnms["lnm1"] = LNMInfo("lnm1")
    kept = state.add(state.new_record(f"0.web.alice.{DOMAIN}", state=states.RUN, lnm="lnm1"))
    record = dict(state.new_record(f"1.web.bob.{DOMAIN}", state=states.RUN, lnm="lnm1"),
                  **added)
    before = snapshot(state)
    try:
        state.add(record)
    except InvalidRequest:
        assert snapshot(state) == before
    consistent(state)
    before = snapshot(state)
    try:
        state.update(kept["name"], **updated)
    except InvalidRequest:
        assert snapshot(state) == before
    consistent(state)

"""Accounting from the SQL plugin's log (usher.plugins.sql.usage) over
hand-made event rows on SQLite."""

import json

import pytest

from usher.plugins.sql import usage
from usher.plugins.sql.store import Store

H = 3600.0   # one hour in seconds
T0 = 1_700_000_000.0


@pytest.fixture
def tx():
    store = Store.open("sqlite:///:memory:")
    store.migrate()
    with store.transaction() as tx:
        yield tx


def event(tx, at, vm, event="vm_state_changed", *, old=None, new=None, owner="alice",
          cluster="sneetch", lnm="lnm1", memory_mib=1024, vcpus=2):
    tx.execute("INSERT INTO events (at, event, vm, owner, cluster, lnm, old_state, new_state, "
               "memory_mib, vcpus) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (T0 + at, event, vm, owner, cluster, lnm, old, new, memory_mib, vcpus))


def report(tx, since, until, by=("owner", "cluster")):
    return usage.usage_report(tx, T0 + since, T0 + until, by)


def only(rows):
    assert len(rows) == 1, rows
    return rows[0]


def test_a_vm_accrues_from_run_until_shutoff(tx):
    event(tx, 0, "1.sneetch", new="starting", old="starting")
    event(tx, 0.5 * H, "1.sneetch", old="starting", new="run")
    event(tx, 2.5 * H, "1.sneetch", old="run", new="shutoff")

    row = only(report(tx, 0, 10 * H))

    assert row == {"owner": "alice", "cluster": "sneetch", "vms": 1, "vm_hours": 2.0,
                   "vcpu_hours": 4.0, "memory_gib_hours": 2.0}


def test_intervals_are_clipped_to_the_period(tx):
    event(tx, 0, "1.sneetch", old="starting", new="run")
    event(tx, 10 * H, "1.sneetch", old="run", new="shutoff")

    assert only(report(tx, 2 * H, 5 * H))["vm_hours"] == 3.0
    # Running before since (its last state before since is run) and after until.
    assert only(report(tx, -5 * H, 3 * H))["vm_hours"] == 3.0
    assert only(report(tx, 8 * H, 20 * H))["vm_hours"] == 2.0
    assert report(tx, 11 * H, 20 * H) == []


def test_a_vm_still_running_counts_up_to_until_and_one_started_in_between_from_its_start(tx):
    event(tx, -100 * H, "1.sneetch", old="starting", new="run")
    event(tx, 3 * H, "2.sneetch", old="starting", new="run", memory_mib=4096, vcpus=4)

    row = only(report(tx, 0, 4 * H))

    assert row["vms"] == 2
    assert row["vm_hours"] == 4.0 + 1.0
    assert row["vcpu_hours"] == 4 * 2 + 1 * 4
    assert row["memory_gib_hours"] == 4 * 1 + 1 * 4


def test_paused_accrues_hibernated_and_shutoff_do_not(tx):
    event(tx, 0, "1.sneetch", old="starting", new="run")
    event(tx, 1 * H, "1.sneetch", old="run", new="paused")
    event(tx, 2 * H, "1.sneetch", old="paused", new="hibernated")
    event(tx, 5 * H, "1.sneetch", old="hibernated", new="run")
    event(tx, 6 * H, "1.sneetch", old="run", new="shutoff")

    assert only(report(tx, 0, 10 * H))["vm_hours"] == 1 + 1 + 1


def test_a_migration_is_counted_once(tx):
    event(tx, 0, "1.sneetch", old="starting", new="run", lnm="lnm1")
    event(tx, 1 * H, "1.sneetch", old="run", new="migrating", lnm="lnm1")
    event(tx, 1.5 * H, "1.sneetch", "migrate_complete", lnm="lnm2")
    event(tx, 1.5 * H, "1.sneetch", old="migrating", new="run", lnm="lnm2")
    # Both LNMs report the VM running for a moment: still one timeline.
    event(tx, 1.6 * H, "1.sneetch", old="run", new="run", lnm="lnm1")

    assert only(report(tx, 0, 3 * H))["vm_hours"] == 3.0


def test_destroy_ends_accrual_and_a_new_vm_of_the_same_name_starts_afresh(tx):
    event(tx, 0, "1.sneetch", old="starting", new="run")
    event(tx, 1 * H, "1.sneetch", "vm_removed")
    event(tx, 4 * H, "1.sneetch", old="starting", new="run", owner="bob", cluster="other")

    rows = report(tx, 0, 5 * H)

    assert [(r["owner"], r["cluster"], r["vm_hours"]) for r in rows] == [
        ("alice", "sneetch", 1.0), ("bob", "other", 1.0)]


def test_destroyed_before_since_counts_nothing(tx):
    event(tx, 0, "1.sneetch", old="starting", new="run")
    event(tx, 1 * H, "1.sneetch", "vm_removed")

    assert report(tx, 2 * H, 5 * H) == []


def test_lost_does_not_accrue_until_the_vm_comes_back(tx):
    event(tx, 0, "1.sneetch", old="starting", new="run")
    event(tx, 1 * H, "1.sneetch", old="run", new="lost")
    event(tx, 1 * H, "1.sneetch", "vm_lost")
    event(tx, 3 * H, "1.sneetch", old="lost", new="run")
    event(tx, 4 * H, "1.sneetch", "vm_lost", memory_mib=None, vcpus=None)

    assert only(report(tx, 0, 6 * H))["vm_hours"] == 1 + 1
    # Lost before since: nothing until it comes back.
    assert only(report(tx, 2 * H, 6 * H))["vm_hours"] == 1


def test_resize_charges_each_interval_what_the_vm_had(tx):
    event(tx, 0, "1.sneetch", old="starting", new="run", memory_mib=1024, vcpus=1)
    event(tx, 1 * H, "1.sneetch", old="run", new="shutoff", memory_mib=None, vcpus=None)
    event(tx, 2 * H, "1.sneetch", old="shutoff", new="run", memory_mib=2048, vcpus=4)

    row = only(report(tx, 0, 3 * H))

    assert (row["vm_hours"], row["vcpu_hours"], row["memory_gib_hours"]) == (2, 1 + 4, 1 + 2)


def test_attributes_missing_on_the_last_row_before_since_are_carried(tx):
    event(tx, 0, "1.sneetch", old="starting", new="starting", memory_mib=2048, vcpus=3)
    event(tx, 1 * H, "1.sneetch", old="starting", new="run", memory_mib=None, vcpus=None,
          owner=None, cluster=None)

    row = only(report(tx, 2 * H, 3 * H))

    assert (row["owner"], row["cluster"], row["vcpu_hours"], row["memory_gib_hours"]) == (
        "alice", "sneetch", 3, 2)


def test_the_owner_falls_back_to_the_request_that_named_the_vm(tx):
    tx.execute("INSERT INTO requests (at, user_name, kind, vms, lnms, args) "
               "VALUES (?, ?, ?, ?, ?, ?)",
               (T0, "carol", "start", json.dumps(["1.pool", "2.pool"]), "[]", "{}"))
    tx.execute("INSERT INTO requests (at, user_name, kind, vms, lnms, args) "
               "VALUES (?, ?, ?, ?, ?, ?)",
               (T0, "dave", "start", json.dumps(["11.pool_x"]), "[]", "{}"))
    event(tx, 0, "1.pool", old="starting", new="run", owner=None, cluster="pool")

    assert only(report(tx, 0, H))["owner"] == "carol"


def test_grouping(tx):
    event(tx, 0, "1.a", old="starting", new="run", owner="alice", cluster="a")
    event(tx, 0, "1.b", old="starting", new="run", owner="alice", cluster="b")
    event(tx, 0, "1.c", old="starting", new="run", owner="bob", cluster="a")

    by_owner = report(tx, 0, H, by=("owner",))
    by_cluster = report(tx, 0, H, by=("cluster",))
    by_both = report(tx, 0, H)

    assert [(r["owner"], r["vms"], r["vm_hours"]) for r in by_owner] == [
        ("alice", 2, 2.0), ("bob", 1, 1.0)]
    assert [(r["cluster"], r["vms"]) for r in by_cluster] == [("a", 2), ("b", 1)]
    assert "cluster" not in by_owner[0] and "owner" not in by_cluster[0]
    assert len(by_both) == 3
    assert usage.total(by_both) == {"vms": 3, "vm_hours": 3.0, "vcpu_hours": 6.0,
                                    "memory_gib_hours": 3.0}


@pytest.mark.parametrize("text, fields", [
    ("owner", ("owner",)), ("cluster", ("cluster",)), ("owner,cluster", ("owner", "cluster")),
    ("cluster, owner", ("cluster", "owner"))])
def test_parse_by(text, fields):
    assert usage.parse_by(text) == fields


@pytest.mark.parametrize("text", ["", "lnm", "owner,owner", "owner,"])
def test_parse_by_refuses(text):
    with pytest.raises(ValueError, match="cannot group by"):
        usage.parse_by(text)


def test_an_empty_period_is_refused(tx):
    with pytest.raises(ValueError, match="period is empty"):
        report(tx, H, H)


def test_the_rows_the_plugin_logs(tx):
    """The plugin's own rows (usher.plugins.sql.log): register_vm and
    start_complete carry the record's state, vm_removed none, address rows
    no state at all."""
    from usher.plugins.sql import log as sqllog
    vm = {"vm": "1.sneetch", "owner": "alice", "cluster": "sneetch", "lnm": "lnm1",
          "memory_mib": 1024, "vcpus": 2}
    sqllog.log_event(tx, at=T0, event="start_request", owner="alice")
    sqllog.log_event(tx, at=T0, event="address_reserved", vm="1.sneetch")
    sqllog.log_event(tx, at=T0 + 1, event="register_vm", new_state="starting", **vm)
    sqllog.log_event(tx, at=T0 + 60, event="start_complete", new_state="run", **vm)
    sqllog.log_event(tx, at=T0 + 60, event="address_used", vm="1.sneetch")
    sqllog.log_event(tx, at=T0 + 60 + H, event="vm_state_changed", old_state="run",
                     new_state="paused", **vm)
    sqllog.log_event(tx, at=T0 + 60 + 2 * H, event="vm_removed", **vm)
    sqllog.log_event(tx, at=T0 + 60 + 2 * H, event="address_released", vm="1.sneetch")

    assert only(report(tx, 0, 10 * H))["vm_hours"] == 2.0

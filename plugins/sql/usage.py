"""Accounting from the SQL plugin's log, as OpenNebula's showback does:
VM-hours, vCPU-hours and memory-GiB-hours per user and virtual cluster over
a period, computed from the ``events`` table (and ``requests`` for a VM whose
events do not name its owner).

What accrues, exactly:

- A VM accrues while its state is ``run``, ``paused`` or ``migrating``: it
  holds its memory and vCPUs on a host in all three (a paused guest keeps its
  memory, a migrating one runs until the switch-over). ``starting``,
  ``shutoff``, ``hibernated``, ``lost``, ``missing`` and ``unknown`` do not
  accrue: the VM holds nothing, or nobody can tell that it does.
- A VM's state is the ``new_state`` of its latest event that has one;
  ``vm_removed`` (delete, forget, missing-then-removed) ends it, and
  ``vm_lost`` / ``vm_missing`` rows without a ``new_state`` set ``lost`` /
  ``missing``. Other events (``migrate_complete``, ``op_complete``, ...) only
  update the VM's attributes.
- One VM has one timeline, keyed by its name, so a migration (events from two
  LNMs, a repeated ``run``) is never counted twice.
- Intervals are clipped to ``[since, until)``: a VM that holds resources at
  ``since`` (its last state before ``since``) counts from ``since``; one that
  still holds them at ``until`` counts up to ``until``.
- An interval is charged to the owner, cluster, memory and vCPUs the VM had
  when it began: the latest non-NULL value of each in its events (the owner
  falls back to the user of the latest request that named the VM).

Plain functions over a ``tx`` (``plugins/sql/store.py``); no Twisted.
"""

from __future__ import annotations

import json

ACCRUING_STATES = frozenset({"run", "paused", "migrating"})
GROUP_FIELDS = ("owner", "cluster")

# Events that change a VM's state without naming one in new_state.
_STATE_OF_EVENT = {"vm_removed": None, "vm_lost": "lost", "vm_missing": "missing"}
_ATTRIBUTES = ("owner", "cluster", "memory_mib", "vcpus")
_COLUMNS = ("vm", "id", "at", "event", "new_state") + _ATTRIBUTES


def _columns(table=""):
    prefix = f"{table}." if table else ""
    return ", ".join(prefix + column for column in _COLUMNS)


def _state_row(table=""):
    """SQL: the row (of ``table``, when given) changes its VM's state."""
    prefix = f"{table}." if table else ""
    names = ", ".join(f"'{name}'" for name in _STATE_OF_EVENT)
    return f"({prefix}new_state IS NOT NULL OR {prefix}event IN ({names}))"


def parse_by(text: str) -> tuple[str, ...]:
    """``"owner,cluster"`` -> ``("owner", "cluster")``; ValueError for
    anything but a non-empty, duplicate-free list of GROUP_FIELDS."""
    fields = tuple(part.strip() for part in text.split(","))
    _check_by(fields)
    return fields


def _check_by(by) -> None:
    if not by or len(set(by)) != len(by) or any(field not in GROUP_FIELDS for field in by):
        raise ValueError(f"cannot group by {','.join(by) or 'nothing'!r}: "
                         f"give one or both of {', '.join(GROUP_FIELDS)}, comma-separated")


def usage_report(tx, since: float, until: float, by=GROUP_FIELDS) -> list[dict]:
    """The usage in ``[since, until)`` (UNIX seconds) grouped by ``by`` ->
    rows sorted by their group: ``{<by fields>..., "vms", "vm_hours",
    "vcpu_hours", "memory_gib_hours"}`` (``vms`` counts the VMs that
    accrued). Groups that accrued nothing are left out."""
    by = tuple(by)
    _check_by(by)
    if not since < until:
        raise ValueError("the period is empty: --since must be before --until")
    totals: dict[tuple, dict] = {}
    for vm, seconds, attributes in _intervals(tx, since, until):
        key = tuple(attributes[field] for field in by)
        row = totals.setdefault(key, {**dict(zip(by, key)), "vms": set(), "vm_hours": 0.0,
                                      "vcpu_hours": 0.0, "memory_gib_hours": 0.0})
        hours = seconds / 3600.0
        row["vms"].add(vm)
        row["vm_hours"] += hours
        row["vcpu_hours"] += hours * (attributes["vcpus"] or 0)
        row["memory_gib_hours"] += hours * (attributes["memory_mib"] or 0) / 1024.0
    rows = [dict(row, vms=len(row["vms"])) for row in totals.values()]
    rows.sort(key=lambda row: tuple("" if row[field] is None else row[field] for field in by))
    return rows


def total(rows: list[dict]) -> dict:
    """The sum of ``usage_report`` rows (``vms`` summed per group)."""
    return {"vms": sum(row["vms"] for row in rows),
            **{name: sum((row[name] for row in rows), 0.0)
               for name in ("vm_hours", "vcpu_hours", "memory_gib_hours")}}


def _intervals(tx, since, until):
    """-> (vm, seconds, attributes) for every accruing interval in the period."""
    state, attributes = _known_before(tx, since)
    window = tx.query(f"SELECT {_columns()} FROM events WHERE vm IS NOT NULL AND at >= ? "
                      "AND at < ? ORDER BY vm, at, id", (since, until))
    by_vm: dict[str, list] = {}
    for row in window:
        by_vm.setdefault(row[0], []).append(row)
    for vm in set(by_vm) - set(attributes):
        attributes[vm] = dict.fromkeys(_ATTRIBUTES)
    _fill_owners(tx, attributes)
    for vm in set(state) | set(by_vm):
        current, held, began = state.get(vm), attributes[vm], since
        for _, _, at, event, new_state, *values in by_vm.get(vm, ()):
            if current in ACCRUING_STATES and at > began:
                yield vm, at - began, dict(held)
            began = at
            held = _carried(held, values)
            if new_state is not None:
                current = new_state
            elif event in _STATE_OF_EVENT:
                current = _STATE_OF_EVENT[event]
        if current in ACCRUING_STATES and until > began:
            yield vm, until - began, dict(held)


def _carried(held: dict, values) -> dict:
    """``held`` updated with the non-NULL ``values`` (in _ATTRIBUTES order)."""
    return {name: held[name] if value is None else value
            for name, value in zip(_ATTRIBUTES, values)}


def _known_before(tx, since):
    """Every VM's state and attributes as its events before ``since`` left
    them -> (state by VM, attributes by VM)."""
    rows = tx.query(
        f"SELECT {_columns('e')} FROM events e "
        "JOIN (SELECT vm, MAX(at) AS last_at FROM events WHERE vm IS NOT NULL AND at < ? "
        f"AND {_state_row()} GROUP BY vm) latest ON e.vm = latest.vm AND e.at = latest.last_at "
        f"WHERE {_state_row('e')} ORDER BY e.vm, e.id", (since,))
    state, attributes = {}, {}
    for vm, _, _, event, new_state, *values in rows:   # the last of equal times wins
        state[vm] = new_state if new_state is not None else _STATE_OF_EVENT[event]
        attributes[vm] = dict(zip(_ATTRIBUTES, values))
    for vm, held in attributes.items():
        for name in [name for name, value in held.items() if value is None]:
            found = tx.query(f"SELECT {name} FROM events WHERE vm = ? AND at < ? AND "
                             f"{name} IS NOT NULL ORDER BY at DESC, id DESC LIMIT 1", (vm, since))
            held[name] = found[0][0] if found else None
    return state, attributes


def _fill_owners(tx, attributes) -> None:
    """The owner of a VM none of whose events name one: the user of the
    latest request whose JSON ``vms`` names it."""
    for vm, held in attributes.items():
        if held["owner"] is not None:
            continue
        pattern = "%" + _escape_like(json.dumps(vm)) + "%"
        for user, vms in tx.query("SELECT user_name, vms FROM requests WHERE vms LIKE ? "
                                  "ESCAPE '!' ORDER BY at DESC, id DESC", (pattern,)):
            if vm in _names(vms):
                held["owner"] = user
                break


def _escape_like(text: str) -> str:
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def _names(vms_json) -> set:
    """The VM names in a request's ``vms`` column (a JSON list of names or of
    records with a ``name``)."""
    try:
        items = json.loads(vms_json or "[]")
    except ValueError:
        return set()
    if not isinstance(items, list):
        return set()
    return {item.get("name") if isinstance(item, dict) else item for item in items}

"""The SQL plugin's request and event log and its mirror of the global
state: plain functions of an open transaction (``store.Transaction``).

- ``requests``: one row per start request the plugin saw (who, which VMs,
  which LNMs suggested, the arguments as JSON), finished with its outcome;
- ``events``: one row per event (state changes with the old and new state,
  and the VM's memory and vCPUs, which ``usage.py`` adds up);
- ``vms``: the mirror, one row per managed VM, as the LNMs report them.
"""

import json

MAX_DETAIL = 2000


def _json(value):
    return json.dumps(value, sort_keys=True, default=str)


def _clip(text):
    return None if text is None else str(text)[:MAX_DETAIL]


def log_request(tx, *, at, user, kind, vms, lnms, args):
    """-> the new request's id."""
    return tx.insert("INSERT INTO requests (at, user_name, kind, vms, lnms, args) "
                     "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                     (at, user, kind, _json(list(vms)), _json(list(lnms)), _json(args or {})))


def log_result(tx, request_id, *, at, ok, detail=None):
    tx.execute("UPDATE requests SET finished_at = ?, ok = ?, detail = ? WHERE id = ?",
               (at, bool(ok), _clip(detail), request_id))


def log_event(tx, *, at, event, vm=None, owner=None, cluster=None, lnm=None, old_state=None,
              new_state=None, memory_mib=None, vcpus=None, detail=None):
    return tx.insert("INSERT INTO events (at, event, vm, owner, cluster, lnm, old_state, "
                     "new_state, memory_mib, vcpus, detail) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                     (at, event, vm, owner, cluster, lnm, old_state, new_state, memory_mib,
                      vcpus, _clip(detail)))


def mirror_upsert(tx, record, at):
    """Insert or replace the mirror's row of a VM (its record)."""
    args = record.get("args") or {}
    tx.execute("INSERT INTO vms (name, owner, cluster, state, lnm, memory_mib, vcpus, uuid, "
               "address, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
               "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
               "cluster = excluded.cluster, state = excluded.state, lnm = excluded.lnm, "
               "memory_mib = excluded.memory_mib, vcpus = excluded.vcpus, "
               "uuid = excluded.uuid, address = excluded.address, "
               "updated_at = excluded.updated_at",
               (record["name"], record.get("owner"), record.get("cluster"),
                record.get("state"), record.get("lnm"), record.get("memory_mib"),
                record.get("vcpus"), record.get("uuid"), args.get("ip_address"), at))


def mirror_update(tx, name, at, **fields):
    """Change some columns (state, lnm, uuid, address) of a VM's mirror row
    -> whether it had one."""
    allowed = {"state", "lnm", "uuid", "address"}
    fields = {k: v for k, v in fields.items() if k in allowed and v is not None}
    if not fields:
        return False
    columns = ", ".join(f"{k} = ?" for k in sorted(fields))
    return tx.execute(f"UPDATE vms SET {columns}, updated_at = ? WHERE name = ?",
                      tuple(fields[k] for k in sorted(fields)) + (at, name)) > 0


def mirror_remove(tx, name):
    tx.execute("DELETE FROM vms WHERE name = ?", (name,))


def mirror(tx):
    """-> the mirror's rows as dicts, by name."""
    columns = ("name", "owner", "cluster", "state", "lnm", "memory_mib", "vcpus", "uuid",
               "address", "updated_at")
    return [dict(zip(columns, row)) for row in
            tx.query(f"SELECT {', '.join(columns)} FROM vms ORDER BY name")]

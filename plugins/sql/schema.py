"""The SQL plugin's schema: numbered migrations, one text for both engines.

Each migration is a list of statements in which ``{id}`` (an integer key the
database numbers), ``{real}`` (a float: times are UNIX seconds) and
``{bigint}`` are spelled for the engine (``render``). ``Store.migrate``
applies, in one transaction each, those above the version the
``schema_version`` table holds. A new version appends a migration here and
raises ``SCHEMA_VERSION``; a published migration never changes.

"No address is ever given twice" is the database's, not the code's: the
primary key on ``addresses.address`` and the unique ``addresses.vm``.
"""

TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY", "real": "REAL", "bigint": "INTEGER"},
    "postgresql": {"id": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION",
                   "bigint": "BIGINT"},
}

MIGRATIONS = {
    1: [
        """CREATE TABLE requests (
            id {id},
            at {real} NOT NULL,
            user_name TEXT NOT NULL,
            kind TEXT NOT NULL,
            vms TEXT NOT NULL,
            lnms TEXT NOT NULL,
            args TEXT NOT NULL,
            finished_at {real},
            ok BOOLEAN,
            detail TEXT)""",
        "CREATE INDEX requests_at ON requests (at)",
        """CREATE TABLE events (
            id {id},
            at {real} NOT NULL,
            event TEXT NOT NULL,
            vm TEXT,
            owner TEXT,
            cluster TEXT,
            lnm TEXT,
            old_state TEXT,
            new_state TEXT,
            memory_mib {bigint},
            vcpus {bigint},
            detail TEXT)""",
        "CREATE INDEX events_vm_at ON events (vm, at)",
        "CREATE INDEX events_at ON events (at)",
        """CREATE TABLE vms (
            name TEXT PRIMARY KEY,
            owner TEXT,
            cluster TEXT,
            state TEXT,
            lnm TEXT,
            memory_mib {bigint},
            vcpus {bigint},
            uuid TEXT,
            address TEXT,
            updated_at {real} NOT NULL)""",
        """CREATE TABLE subnets (
            name TEXT PRIMARY KEY,
            cidr TEXT NOT NULL UNIQUE,
            family INTEGER NOT NULL,
            vlan INTEGER,
            gateway TEXT,
            dns TEXT NOT NULL,
            excluded TEXT NOT NULL,
            bridge TEXT,
            network TEXT)""",
        """CREATE TABLE ranges (
            id {id},
            subnet TEXT NOT NULL REFERENCES subnets (name),
            first_address TEXT NOT NULL,
            last_address TEXT NOT NULL,
            owner TEXT,
            cluster TEXT)""",
        "CREATE INDEX ranges_owner ON ranges (owner, cluster)",
        """CREATE TABLE addresses (
            address TEXT PRIMARY KEY,
            sort_key TEXT NOT NULL,
            subnet TEXT NOT NULL REFERENCES subnets (name),
            range_id {bigint} NOT NULL REFERENCES ranges (id),
            vm TEXT UNIQUE,
            owner TEXT,
            cluster TEXT,
            state TEXT NOT NULL,
            reserved_at {real} NOT NULL,
            request_id {bigint})""",
        "CREATE INDEX addresses_range_key ON addresses (range_id, sort_key)",
        "CREATE INDEX addresses_owner ON addresses (owner, cluster)",
    ],
}

SCHEMA_VERSION = max(MIGRATIONS)


def render(statement, engine):
    """One migration statement spelled for ``engine`` ("sqlite", "postgresql")."""
    return statement.format(**TYPES[engine])

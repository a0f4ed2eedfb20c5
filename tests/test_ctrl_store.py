"""The controller's state store (usher.controller.store): today's files,
byte for byte, and the HA database's table with every write fenced by the
term of leadership (a real PostgreSQL, tests/pgserver.py)."""

import functools
import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from usher.controller.known_lnms import KnownLNMs
from usher.controller.leadership import LeadershipDB, connect
from usher.controller.store import FileStateStore, PgStateStore, StaleTerm
from usher.persist import write_json_atomic


def test_file_store_writes_todays_files_byte_for_byte(tmp_path):
    store = FileStateStore(str(tmp_path))
    data = {"node1": {"hostname": "h1", "holds": {}}, "node2": {"hostname": "h2"}}
    store.save("lnms", data)
    write_json_atomic(str(tmp_path / "reference.json"), data, prefix=".lnms.")
    assert (tmp_path / "lnms.json").read_bytes() == (tmp_path / "reference.json").read_bytes()
    assert store.load("lnms") == data
    assert store.load("affinity") is None
    # What KnownLNMs wrote with a path, the store reads, and the reverse.
    known = KnownLNMs(str(tmp_path / "lnms.json"))
    assert known.entries == data
    assert KnownLNMs(store=store).entries == data


def test_file_store_leftovers_of_a_crash_are_removed(tmp_path):
    (tmp_path / ".lnms.abc").write_text("half")
    (tmp_path / ".affinity.json.x").write_text("half")
    store = FileStateStore(str(tmp_path))
    store.load("lnms")
    store.load("affinity")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_file_store_coalesces_writes_made_while_one_runs(tmp_path):
    started = []

    def run(f):
        d = defer.Deferred()
        started.append((f, d))
        return d
    store = FileStateStore(str(tmp_path), run)
    first = store.save("affinity", {"rules": [1]})
    waits = [store.save("affinity", {"rules": [n]}) for n in (2, 3, 4)]
    assert len(started) == 1
    f, d = started.pop()
    f()
    d.callback(None)
    assert first.called
    assert len(started) == 1 and not any(w.called for w in waits)
    f, d = started.pop()
    f()
    d.callback(None)
    assert all(w.called for w in waits)
    assert json.loads((tmp_path / "affinity.json").read_text()) == {"rules": [4]}


# -- the HA database ---------------------------------------------------------------


@pytest.fixture
def database(postgres, request):
    name = "store_" + request.node.name[5:40].lower()
    return postgres.create_database(name)


def _runner(pool):
    return functools.partial(threads.deferToThreadPool, reactor, pool)


@pytest_twisted.ensureDeferred
async def test_pg_store_saves_loads_and_fences_an_old_term(database, pool):
    run = _runner(pool)
    first, second = LeadershipDB(lambda: connect(database)), LeadershipDB(
        lambda: connect(database))
    term1, _ = await run(first.try_acquire, "ctrl-a")
    assert term1 == 1
    fenced = []
    store = PgStateStore(lambda: connect(database), run, term=lambda: term1,
                         on_fenced=fenced.append)
    await store.save("lnms", {"node1": {"hostname": "h1"}})
    await store.save("lnms", {"node1": {"hostname": "h2"}})
    again = PgStateStore(lambda: connect(database), run, term=lambda: term1)
    await again.load_all()
    assert again.load("lnms") == {"node1": {"hostname": "h2"}}
    assert again.load("leases") is None

    # Another controller takes the lock (the first one's session ended) and
    # a newer term: the old leader's write is refused, the data stays.
    await run(first.close)
    term2, _ = await run(second.try_acquire, "ctrl-b")
    assert term2 == 2
    with pytest.raises(StaleTerm):
        await store.save("lnms", {"node1": {"hostname": "stale"}})
    assert fenced and isinstance(fenced[0], StaleTerm)
    new = PgStateStore(lambda: connect(database), run, term=lambda: term2)
    await new.load_all()
    assert new.load("lnms") == {"node1": {"hostname": "h2"}}
    await new.save("lnms", {"node1": {"hostname": "h3"}})
    for s in (store, again, new):
        await s.close()
    await run(second.close)


@pytest_twisted.ensureDeferred
async def test_the_lock_is_exclusive_and_terms_only_grow(database, pool):
    run = _runner(pool)
    a, b = LeadershipDB(lambda: connect(database)), LeadershipDB(lambda: connect(database))
    assert (await run(a.try_acquire, "a"))[0] == 1
    assert await run(b.try_acquire, "b") == (None, "a")
    assert await run(a.check, 1)
    await run(a.close)
    assert (await run(b.try_acquire, "b"))[0] == 2
    assert (await run(a.try_acquire, "a"))[0] is None
    await run(b.close)
    assert (await run(a.try_acquire, "a"))[0] == 3
    await run(a.close)


# -- the callers, on a store --------------------------------------------------------


class MemoryStore(FileStateStore):
    """A store of the interface that records what it was given (the
    callers must go through the store, not files, when one is set)."""

    def __init__(self):
        super().__init__("/nonexistent")
        self.saved = {}

    def load(self, name):
        return self.saved.get(name)

    def _write(self, name, data):
        self.saved[name] = data
        return defer.succeed(None)


@pytest_twisted.ensureDeferred
async def test_affinity_and_leases_use_the_store_when_one_is_set(tmp_path):
    from plugins.leases.store import LeaseStore
    from usher.controller.affinity import AffinityRules
    store = MemoryStore()
    rules = AffinityRules(str(tmp_path), store=store)
    await rules.set("alice", "web", "apart")
    assert store.saved["affinity"] == {"rules": [
        {"owner": "alice", "cluster": "web", "rule": "apart"}]}
    assert AffinityRules(str(tmp_path), store=store).rule("alice", "web") == "apart"

    class API:
        state_dir = str(tmp_path)

        def __init__(self, store):
            self.store = store
    leases = LeaseStore(API(store))
    leases.set("alice-vm1", "alice", 1e9)
    await leases.flushed()
    assert store.saved["leases"]["leases"]["alice-vm1"]["owner"] == "alice"
    assert LeaseStore(API(store)).leases["alice-vm1"]["expires"] == 1e9
    assert sorted(p.name for p in tmp_path.iterdir()) == []     # no files
    known = KnownLNMs(store=store)
    known.remember("node1", hostname="h1")
    assert store.saved["lnms"] == {"node1": {"hostname": "h1"}}

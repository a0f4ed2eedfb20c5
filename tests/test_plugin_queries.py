"""Plugin queries (``api.register_query``, ``client.query``): through the real
client port, a test plugin answers each user what it decides they may see;
hostile names and arguments are refused at the boundary; a failing handler
is logged and reported; queries go away with their plugin."""

import json
import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, task

from usher.controller.events import EventChains
from usher.controller.plugins import PluginRegistry
from usher.errors import InvalidRequest, OperationFailed, PermissionDenied
from usher.controller.queries import MAX_QUERY_ARGS_BYTES

from tests.hostile import LogCapture, connect_pb, remote_type
from tests.clientgrid import PASSWORDS

# Rows of every user; a user sees their own, an administrator everyone's or
# one owner's (as ipam.ranges does).
LEDGER = '''
"""Test plugin: answers queries about a ledger of rows by owner."""
from usher.errors import PermissionDenied

ROWS = [{"owner": "alice", "item": "a1"}, {"owner": "alice", "item": "a2"},
        {"owner": "bob", "item": "b1"}]


class Plugin:
    def __init__(self, config, api):
        api.register_query("ledger.rows", self.rows)
        api.register_query("ledger.echo", self.echo)
        api.register_query("ledger.broken", self.broken)
        api.register_query("ledger.not_a_list", self.not_a_list)
        api.register_query("ledger.hang", self.hang)
        self.api = api

    def entry_point(self, event):
        pass

    async def rows(self, user, admin, args):
        owner = args.get("owner")
        if owner is not None and not admin:
            raise PermissionDenied("only administrators may name an owner")
        if admin:
            return [r for r in ROWS if owner is None or r["owner"] == owner]
        return [r for r in ROWS if r["owner"] == user]

    async def echo(self, user, admin, args):
        return [{"user": user, "admin": admin, "args": args}]

    def broken(self, user, admin, args):
        raise KeyError("secret detail")

    async def not_a_list(self, user, admin, args):
        return {"user": user}

    def hang(self, user, admin, args):
        from twisted.internet import defer
        return defer.Deferred()
'''

REGISTRATION = {"ledger": {"plugin": "ledger", "events": ["start_request"], "config": None,
                           "order": None}}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


async def ledger_grid(tmp_path, client_grids):
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "ledger.py", LEDGER)
    registrations = dict(REGISTRATION)
    grid = await client_grids(plugin_dir=str(plugin_dir), registrations=registrations)
    await grid.connected("root")   # warm: the plugins are registered at start
    return grid


@pytest_twisted.ensureDeferred
async def test_a_user_sees_only_what_the_handler_gives_them(tmp_path, client_grids):
    grid = await ledger_grid(tmp_path, client_grids)
    alice = await grid.connected("alice")
    bob = await grid.connected("bob")
    root = await grid.connected("root")
    assert await alice.query("ledger.rows") == [{"owner": "alice", "item": "a1"},
                                                {"owner": "alice", "item": "a2"}]
    assert await bob.query("ledger.rows") == [{"owner": "bob", "item": "b1"}]
    with pytest.raises(PermissionDenied, match="only administrators may name an owner"):
        await alice.query("ledger.rows", owner="bob")
    assert len(await root.query("ledger.rows")) == 3
    assert await root.query("ledger.rows", owner="bob") == [{"owner": "bob", "item": "b1"}]
    # The handler is told who asks by the controller, not by the caller.
    assert await bob.query("ledger.echo", user="root", admin=True, deep={"a": [1, None]}) == [
        {"user": "bob", "admin": False, "args": {"user": "root", "admin": True,
                                                  "deep": {"a": [1, None]}}}]


@pytest_twisted.ensureDeferred
async def test_unknown_queries_and_failing_handlers_are_clear_errors(tmp_path, client_grids):
    grid = await ledger_grid(tmp_path, client_grids)
    alice = await grid.connected("alice")
    with pytest.raises(InvalidRequest, match=r"no such query: ledger.nosuch \(registered: "
                                             r"ledger.broken, ledger.echo, ledger.hang"):
        await alice.query("ledger.nosuch")
    with LogCapture() as logged:
        with pytest.raises(OperationFailed, match="query ledger.broken failed; see the "
                                                  "controller's log") as raised:
            await alice.query("ledger.broken")
        assert "secret detail" not in str(raised.value)
        with pytest.raises(OperationFailed, match="ledger.not_a_list gave an answer that "
                                                  "cannot be sent"):
            await alice.query("ledger.not_a_list")
    tracebacks = [t for t in logged.problems() if "Traceback" in t]
    assert any("query ledger.broken failed for alice" in t and "secret detail" in t
               for t in tracebacks)
    assert any("ledger.not_a_list" in t and "not a list" in t for t in tracebacks)
    # the controller goes on serving
    assert await alice.query("ledger.rows")


@pytest_twisted.ensureDeferred
async def test_a_handler_that_never_answers_times_out(tmp_path, client_grids):
    grid = await ledger_grid(tmp_path, client_grids)
    grid.controller.chains.timeout = 0.2
    alice = await grid.connected("alice")
    with pytest.raises(OperationFailed, match="query ledger.hang did not answer in time"):
        await alice.query("ledger.hang")


@pytest_twisted.ensureDeferred
async def test_hostile_names_and_arguments_are_refused_at_the_boundary(tmp_path,
                                                                       client_grids):
    grid = await ledger_grid(tmp_path, client_grids)
    raw = await connect_pb(grid.port.getHost().port, grid.ca_file)
    perspective = await raw.root.callRemote("login", "alice", PASSWORDS["alice"], None)
    called = []
    grid.registry.queries.register("ledger.count", lambda *a: called.append(a) or [])

    async def refused(name, args_json, match):
        with pytest.raises(Exception) as raised:
            await perspective.callRemote("query", name, args_json)
        assert remote_type(raised.value) == "usher.errors.InvalidRequest", raised.value
        assert match in str(raised.value), raised.value

    with LogCapture() as logged:
        for name in ("", "Ledger.rows", "ledger rows", "ledger/rows", "x" * 65, "ledger.rows\n",
                     "lédger", 7, None, ["ledger.rows"], b"ledger.rows"):
            await refused(name, "{}", "invalid query name")
        for args_json, match in (
                ("[]", "JSON object"), ("7", "JSON object"), ('"x"', "JSON object"),
                ("null", "JSON object"), ("{", "malformed JSON object"),
                ('{"a": 1', "malformed"), (b"\xff\xfe", "malformed"),
                (json.dumps({"a": "x" * MAX_QUERY_ARGS_BYTES}), "at most 16384"),
                ("{" + " " * (MAX_QUERY_ARGS_BYTES + 1) + "}", "at most 16384"),
                ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested"),
                ('{"a": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than"),
                (None, "JSON object"), (["{}"], "JSON object"), ({"a": 1}, "JSON object")):
            await refused("ledger.count", args_json, match)
        await refused("ledger.count", "{}\x00", "malformed")
    assert called == []
    assert logged.problems() == []
    # the largest arguments allowed pass
    fitting = json.dumps({"a": "x" * (MAX_QUERY_ARGS_BYTES - 10)})
    assert await perspective.callRemote("query", "ledger.count", fitting) == []
    assert len(called) == 1
    await raw.close()
    with pytest.raises(InvalidRequest, match="not JSON"):
        await (await grid.connected("alice")).query("ledger.rows", when=object())


@pytest_twisted.ensureDeferred
async def test_queries_go_away_with_their_plugin(tmp_path, client_grids):
    grid = await ledger_grid(tmp_path, client_grids)
    root = await grid.connected("root")
    await root.register_plugin("ledger", "vm_removed")
    await root.unregister_plugin("ledger", "start_request")
    # still on one chain: still answering
    assert len(await root.query("ledger.rows")) == 3
    await root.unregister_plugin("ledger")
    with pytest.raises(InvalidRequest, match=r"no such query: ledger.rows \(registered: none"):
        await root.query("ledger.rows")
    await root.register_plugin("ledger", "start_request")
    assert len(await root.query("ledger.rows")) == 3


def test_a_plugin_that_fails_to_start_leaves_no_query(tmp_path):
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "halfway.py", '''
        class Plugin:
            def __init__(self, config, api):
                api.register_query("halfway.q", lambda user, admin, args: [])
                raise ValueError("no database")

            def entry_point(self, event):
                pass
        ''')
    write(plugin_dir / "noentry.py", '''
        class Plugin:
            def __init__(self, config, api):
                api.register_query("noentry.q", lambda user, admin, args: [])
        ''')
    registry = PluginRegistry(EventChains(task.Clock()), api=None,
                              third_party_dir=str(plugin_dir))

    class API:
        def register_query(self, name, handler):
            registry.queries.register(name, handler)
    registry.api = API()
    for name in ("halfway", "noentry"):
        with pytest.raises(InvalidRequest):
            registry.register(name, "start_request")
    assert registry.queries.names() == []


def test_query_names_and_handlers_are_checked_on_registration():
    registry = PluginRegistry(EventChains(task.Clock()), api=None)
    queries = registry.queries
    for name in ("", "A", "a b", "x" * 65, None):
        with pytest.raises(InvalidRequest, match="invalid query name"):
            queries.register(name, lambda *a: [])
    with pytest.raises(InvalidRequest, match="must be callable"):
        queries.register("q", "not callable")
    queries.register("q", lambda *a: [])
    with pytest.raises(InvalidRequest, match="already registered"):
        queries.register("q", lambda *a: [])
    assert queries.unregister("q") and not queries.unregister("q")


def test_a_large_answer_is_sent_in_chunks():
    clock = task.Clock()
    registry = PluginRegistry(EventChains(clock), api=None)
    rows = [{"n": i, "pad": "x" * 1000} for i in range(1000)]
    registry.queries.register("big", lambda user, admin, args: defer.succeed(rows))
    chunks = []
    defer.Deferred.fromCoroutine(
        registry.queries.answer("big", "alice", False, {})).addCallback(chunks.extend)
    assert len(chunks) > 1
    assert [row for chunk in chunks for row in json.loads(chunk)] == rows


FAKE_IPAM = '''
"""Test plugin: ipam.ranges as the SQL plugin answers it."""


class Plugin:
    def __init__(self, config, api):
        api.register_query("ipam.ranges", self.ranges)

    def entry_point(self, event):
        pass

    async def ranges(self, user, admin, args):
        return [{"id": 1, "subnet": "lab", "first": "10.1.0.10", "last": "10.1.0.19",
                 "owner": args.get("owner", user), "cluster": None, "free": 10}]
'''


@pytest_twisted.ensureDeferred
async def test_ush_ranges_through_the_real_client(tmp_path, client_grids):
    from tests.test_plugins_ush import run_ush
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "fakeipam.py", FAKE_IPAM)
    grid = await client_grids(plugin_dir=str(plugin_dir), registrations={
        "fakeipam": {"plugin": "fakeipam", "events": ["vm_removed"], "config": None,
                     "order": None}})
    code, out, err = await run_ush(grid, "alice", "ranges")
    assert code == 0, err
    assert "1 address range, 10 addresses free:" in out
    assert "10.1.0.10" in out and "owner" not in out
    code, out, err = await run_ush(grid, "root", "ranges", "-o", "bob", json_output=True)
    assert code == 0, err
    assert json.loads(out)[0]["owner"] == "bob"
    code, out, err = await run_ush(grid, "alice", "addresses")
    assert code == 2 and "no such query: ipam.addresses (registered: ipam.ranges)" in err

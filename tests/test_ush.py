"""ush, the Usher shell, against an in-memory double of the client library.

The double (FakeClient over a FakeWorld) implements the UsherClient API:
Deferred-returning methods, a cache of the user's VMs, change and connection
callbacks, Table 3 preconditions. Replies come at once, or are held until
the test releases them to exercise the asynchronous flow of Figure 3.
"""

import importlib
import io
import json
import re

import pytest
from twisted.internet import defer, task

from usher import naming, states
from usher.errors import (AuthenticationFailed, ConfigError, InvalidRequest, NoSuchVM,
                          Unavailable)
from usher.vmset import Selection, match_names

try:
    ush = importlib.import_module("usher.clients.ush")
    ush_help = importlib.import_module("usher.clients.ush.help_text")
except ImportError:  # before packaging: the source tree's clients/ package
    ush = importlib.import_module("clients.ush")
    ush_help = importlib.import_module("clients.ush.help_text")

DOMAIN = "usher.ucsdys.net"
USER = "mmcnett"


def full(short, user=USER):
    return f"{short}.{user}.{DOMAIN}"


def record(short, state="run", lnm="vmm47", user=USER, **extra):
    name = full(short, user)
    rec = {"name": name, "owner": user, "cluster": naming.cluster_of(short), "state": state,
           "lnm": lnm, "memory_mib": 256, "vcpus": 1, "uuid": f"uuid-{name}",
           "managed": True, "version": 1, "args": {}}
    rec.update(extra)
    return rec


class FakeWorld:
    """The controller's side: users, VMs, LNMs; records calls."""

    def __init__(self):
        self.passwords = {USER: "secret", "bob": "bobpw"}
        self.admins = set()
        self.vms = {}
        self.lnms = {f"vmm{n}.{DOMAIN}": {"cpus": 8, "memory_mib": 16384} for n in (43, 44, 47)}
        self.placements = []  # LNM for each VM started, in order; else round-robin
        self.start_failures = {}  # full name -> error
        # Plugin queries: name -> function(user, admin, args) -> rows
        self.queries = {}
        self.elapsed = 2.0
        self.reachable = True
        self.hold = False
        self.held = []
        self.calls = []
        self.clients = []

    def add(self, rec):
        self.vms[rec["name"]] = rec
        return rec

    def release(self):
        held, self.held = self.held, []
        for d, action in held:
            defer.maybeDeferred(action).chainDeferred(d)


class FakeClient:
    def __init__(self, world, host, port, username, password):
        self.world = world
        self.host, self.port, self.username, self.password = host, port, username, password
        self.connected = False
        self.user = None
        self.domain = None
        self.admin = False
        self.vms = {}
        self._change_callbacks = []
        self._connection_callbacks = []
        world.clients.append(self)

    # -- plumbing ---------------------------------------------------------

    def _reply(self, method, action, **kwargs):
        self.world.calls.append((method, kwargs))
        if self.world.hold:
            d = defer.Deferred()
            self.world.held.append((d, action))
            return d
        return defer.maybeDeferred(action)

    def _remote(self):
        if not self.connected:
            raise Unavailable("not connected to the controller")

    def on_change(self, callback):
        self._change_callbacks.append(callback)
        return lambda: self._change_callbacks.remove(callback)

    def on_connection(self, callback):
        self._connection_callbacks.append(callback)
        return lambda: self._connection_callbacks.remove(callback)

    def fire_changes(self, changed, removed=()):
        for rec in changed:
            self.vms[rec["name"]] = dict(rec)
        removed = [name for name in removed if self.vms.pop(name, None) is not None]
        for callback in list(self._change_callbacks):
            callback([dict(r) for r in changed], removed)

    def fire_connection(self, state, detail):
        for callback in list(self._connection_callbacks):
            callback(state, detail)

    def _mine(self):
        return {n: dict(r) for n, r in self.world.vms.items()
                if self.admin or r["owner"] == self.user}

    # -- connection -------------------------------------------------------

    def connect(self):
        def action():
            if not self.world.reachable:
                raise Unavailable(f"cannot reach the controller at {self.host}:{self.port}")
            if self.world.passwords.get(self.username) != self.password:
                raise AuthenticationFailed("authentication failed")
            self.user, self.domain = self.username, DOMAIN
            self.admin = self.username in self.world.admins
            old = self.vms
            self.vms = self._mine()
            self.connected = True
            if old:
                self.fire_changes(list(self.vms.values()), sorted(set(old) - set(self.vms)))
            return {"user": self.user, "admin": self.admin, "domain": self.domain}
        return self._reply("connect", action)

    def reconnect(self):
        d = self.disconnect()
        d.addCallback(lambda _: self.connect())
        return d

    def disconnect(self):
        self.world.calls.append(("disconnect", {}))
        self.connected = False
        return defer.succeed(None)

    # -- Table 4 ------------------------------------------------------------

    def _select(self, selection):
        if selection is None:
            selection = Selection(everything=True)
        chosen, unknown = selection.pick(self.vms, lambda n: naming.qualify(n, self.user,
                                                                          self.domain))
        if unknown:
            raise NoSuchVM(f"no such VM: {', '.join(unknown)}")
        return chosen

    def select(self, selection):
        """The cache's resolution, as UsherClient.select (no remote call)."""
        return self._select(selection)

    def list(self, selection=None, status=False, remote=False):
        if not remote and not status:
            try:
                return defer.succeed(sorted((dict(r) for r in self._select(selection)),
                                            key=lambda r: r["name"]))
            except Exception as exc:
                return defer.fail(exc)

        def action():
            self._remote()
            if not remote:
                records = [dict(r) for r in self._select(selection)]
            elif selection is None:
                records = [dict(r) for r in self._mine().values()]
            else:       # the controller's view: every VM an administrator may see
                records, _ = selection.pick(self._mine(), lambda n: naming.qualify(
                    n, self.user, self.domain))
                records = [dict(r) for r in records]
            if status:
                for rec in records:
                    rec["cpu_percent"] = 1.5
            return records
        return self._reply("list", action, selection=selection, status=status, remote=remote)

    def list_lnm(self, patterns=(), status=False):
        def action():
            self._remote()
            names = match_names(list(self.world.lnms), list(patterns)) if patterns \
                else list(self.world.lnms)
            result = []
            for name in names:
                item = {"name": name, "connected": True,
                        "vms": sum(1 for r in self.world.vms.values() if r["lnm"] == name),
                        **self.world.lnms[name]}
                if status:
                    item["free_memory_mib"] = 8000
                result.append(item)
            return result
        return self._reply("list_lnm", action, patterns=list(patterns), status=status)

    def start(self, names=(), cluster=None, count=None, lnms=(), args=None):
        def action():
            self._remote()
            if count is not None and cluster is None:
                raise InvalidRequest("a count needs a cluster name")
            if count is not None:
                shorts = [f"{i}.{cluster}" for i in range(1, count + 1)]
            else:
                shorts = [n for pattern in names for n in
                          Selection(names=[pattern]).names]
            hosts = list(lnms) or list(self.world.lnms)
            started, failed, changed = [], [], []
            for index, short in enumerate(shorts):
                name = naming.qualify(short, self.user, self.domain)
                if name in self.world.start_failures:
                    failed.append({"name": name, "error": self.world.start_failures[name]})
                    continue
                vmm = (self.world.placements[index] if index < len(self.world.placements)
                       else hosts[index % len(hosts)])
                rec = self.world.add(record(name.split(f".{self.user}.")[0], lnm=vmm,
                                            user=self.user, args=dict(args or {})))
                changed.append(rec)
                started.append({"name": name, "lnm": vmm})
            self.fire_changes(changed)
            return {"started": started, "failed": failed, "notes": [],
                    "elapsed": self.world.elapsed}
        return self._reply("start", action, names=list(names), cluster=cluster, count=count,
                           lnms=list(lnms), args=args)

    def op_on(self, operation, selection, args=None):
        def action():
            self._remote()
            if operation not in states.OPERATIONS:
                raise InvalidRequest(f"unknown operation {operation!r}")
            records = self._select(selection)
            if not records:
                raise NoSuchVM("no VM matches")
            done, failed, changed, removed = [], [], [], []
            allowed = set(states.OPERATION_PRECONDITIONS[operation])
            if (args or {}).get("force"):
                allowed |= states.DELETE_FORCED_FROM
            for rec in records:
                if rec["state"] not in allowed:
                    failed.append({"name": rec["name"],
                                   "error": f"cannot {operation} a VM in state {rec['state']}"})
                    continue
                new_state = states.OPERATION_RESULT[operation]
                if new_state is None:
                    del self.world.vms[rec["name"]]
                    removed.append(rec["name"])
                else:
                    self.world.vms[rec["name"]]["state"] = new_state
                    changed.append(dict(self.world.vms[rec["name"]]))
                done.append({"name": rec["name"], "state": new_state})
            self.fire_changes(changed, removed)
            return {"done": done, "failed": failed, "notes": []}
        return self._reply("op_on", action, operation=operation, selection=selection,
                           args=args)

    def _operation(operation):
        def method(self, selection):
            return self.op_on(operation, selection)
        method.__name__ = operation
        return method

    for _op in states.OPERATIONS:
        locals()[_op] = _operation(_op)
    del _op, _operation

    def migrate(self, selection, lnms=()):
        def action():
            self._remote()
            records = self._select(selection)
            targets = match_names(list(self.world.lnms), list(lnms))
            migrated, changed = [], []
            for index, rec in enumerate(records):
                target = targets[index % len(targets)]
                migrated.append({"name": rec["name"], "from": rec["lnm"], "to": target})
                self.world.vms[rec["name"]]["lnm"] = target
                changed.append(dict(self.world.vms[rec["name"]]))
            self.fire_changes(changed)
            return {"migrated": migrated, "failed": [], "notes": []}
        return self._reply("migrate", action, selection=selection, lnms=list(lnms))

    def query(self, name, /, **args):
        def action():
            self._remote()
            if name not in self.world.queries:
                raise InvalidRequest(f"no such query: {name} (registered: none)")
            return self.world.queries[name](self.user, self.admin, args)
        return self._reply("query", action, name=name, args=args)


class FakePrompter:
    """Answers the password prompt, echoing it like a terminal would."""

    def __init__(self, out, answer="secret"):
        self.out = out
        self.answer = answer
        self.prompts = []

    def ask_password(self, prompt):
        self.prompts.append(prompt)
        self.out.write(prompt.rstrip() + "\n")
        if self.answer is None:
            return defer.fail(ush.Cancelled())
        return defer.succeed(self.answer)


def settings(**overrides):
    values = dict(controller_host="ctl.example.org", controller_port=7390, username=USER,
                  password=None, history_file=None)
    values.update(overrides)
    return ush.UshSettings(**values)


def fired(d):
    """The result of a Deferred that must have fired already."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], defer.Failure):
        results[0].raiseException()
    return results[0]


class Harness:
    """A Shell wired to a FakeWorld, typing lines like a terminal would."""

    def __init__(self, world=None, password=None, settings_overrides=None, **shell_kwargs):
        self.world = world or FakeWorld()
        self.out = io.StringIO()
        self.prompter = FakePrompter(self.out)
        self.factory_calls = []
        self.shell = ush.Shell(self.factory, settings(password=password,
                                                      **(settings_overrides or {})),
                               out=self.out,
                               prompter=self.prompter, clock=task.Clock(), **shell_kwargs)

    def factory(self, host, port, username, password):
        self.factory_calls.append((host, port, username, password))
        return FakeClient(self.world, host, port, username, password)

    def type(self, line):
        """Echo the prompt and line, run it; -> the shell's readiness Deferred."""
        self.out.write(self.shell.prompt + line + "\n")
        return self.shell.handle_line(line)

    def run(self, line):
        """Type a line and return only the output it produced."""
        start = len(self.out.getvalue())
        assert fired(self.type(line)) is True
        return self.out.getvalue()[start:]

    def connect(self):
        self.run("connect")
        assert self.shell.client.connected
        return self.shell.client

    @property
    def client(self):
        return self.shell.client

    def sent(self, method=None):
        return [c for c in self.world.calls if method is None or c[0] == method]


def sample_world():
    world = FakeWorld()
    world.add(record("horton", lnm=f"vmm47.{DOMAIN}"))
    world.add(record("usher", lnm=f"vmm52.{DOMAIN}"))
    return world


# --- Figure 3 -------------------------------------------------------------------

FIGURE_3 = """\
Usher Shell {version}
Type '?' or 'help' for help
Use: help <command> for command specific help
ush> connect
Password:
<Command 0 result pending...>
Command 0 result:
Connected
mmcnett:ush> list
2 VMs:
-----
VM                                     state    LNM
-----
horton.mmcnett.usher.ucsdys.net        run      vmm47.usher.ucsdys.net
usher.mmcnett.usher.ucsdys.net         run      vmm52.usher.ucsdys.net
mmcnett:ush> start -n sneetch -c 10
<Command 1 result pending...>
Command 1 result:
Controller started 10 VMs in 2 seconds:
1.sneetch.mmcnett.usher.ucsdys.net started on vmm43.usher.ucsdys.net
2.sneetch.mmcnett.usher.ucsdys.net started on vmm74.usher.ucsdys.net
3.sneetch.mmcnett.usher.ucsdys.net started on vmm74.usher.ucsdys.net
4.sneetch.mmcnett.usher.ucsdys.net started on vmm48.usher.ucsdys.net
5.sneetch.mmcnett.usher.ucsdys.net started on vmm60.usher.ucsdys.net
6.sneetch.mmcnett.usher.ucsdys.net started on vmm71.usher.ucsdys.net
7.sneetch.mmcnett.usher.ucsdys.net started on vmm46.usher.ucsdys.net
8.sneetch.mmcnett.usher.ucsdys.net started on vmm78.usher.ucsdys.net
9.sneetch.mmcnett.usher.ucsdys.net started on vmm72.usher.ucsdys.net
10.sneetch.mmcnett.usher.ucsdys.net started on vmm44.usher.ucsdys.net
mmcnett:ush> """


def test_figure_3_session():
    world = sample_world()
    world.placements = [f"vmm{n}.{DOMAIN}" for n in (43, 74, 74, 48, 60, 71, 46, 78, 72, 44)]
    h = Harness(world)
    h.out.write(ush.banner() + "\n")
    h.run("connect")
    h.run("list")
    h.run("start -n sneetch -c 10")
    h.out.write(h.shell.prompt)
    assert h.out.getvalue() == FIGURE_3.format(version=ush.version())
    assert h.prompter.prompts == ["Password: "]
    assert h.factory_calls == [("ctl.example.org", 7390, USER, "secret")]
    assert h.sent("start") == [("start", {"names": [], "cluster": "sneetch", "count": 10,
                                          "lnms": [], "args": None})]


def test_list_answers_from_the_cache_without_a_command_number():
    h = Harness(sample_world())
    h.connect()
    h.world.calls.clear()
    output = h.run("list")
    assert "pending" not in output and "Command" not in output
    assert h.sent("list") == []  # the fake's cache path records nothing
    # The next remote command still gets number 1: list did not use one.
    assert "<Command 1 result pending...>" in h.run("list_lnm")


def test_results_arrive_asynchronously_while_typing_goes_on():
    h = Harness(sample_world())
    h.connect()
    h.world.hold = True
    ready = h.type("start -n sneetch -c 2")
    assert fired(ready) is True  # the prompt comes back before the result
    assert h.out.getvalue().endswith("<Command 1 result pending...>\n")
    assert 1 in h.shell.pending
    # list still answers at once from the cache while start is pending.
    assert "2 VMs:" in h.run("list")
    h.world.release()
    tail = h.out.getvalue().split("2 VMs:")[1]
    assert "Command 1 result:\nController started 2 VMs in 2 seconds:\n" in tail
    assert h.shell.pending == {}
    assert "[notice]" not in h.out.getvalue()  # our own start's VMs are in its result


def test_script_input_waits_for_each_result():
    h = Harness(sample_world(), wait_for_results=True)
    h.connect()
    h.world.hold = True
    ready = h.type("pause horton")
    assert not ready.called
    h.world.release()
    assert fired(ready) is True


def test_quit_waits_for_pending_commands():
    h = Harness(sample_world())
    h.connect()
    h.world.hold = True
    h.type("pause horton")
    leaving = h.type("quit")
    assert not leaving.called
    assert "Waiting for 1 pending command" in h.out.getvalue()
    h.world.release()
    assert fired(leaving) is False
    assert fired(h.shell.handle_line(None)) is False  # EOF leaves too
    assert fired(h.shell.handle_line("exit")) is False


def test_close_logs_out():
    h = Harness(sample_world())
    h.connect()
    fired(h.shell.close())
    assert h.sent("disconnect")
    assert h.shell.client is None


# --- connect / disconnect / reconnect ------------------------------------------------

def test_connect_with_configured_password_does_not_prompt():
    h = Harness(sample_world(), password="secret")
    output = h.run("connect")
    assert h.prompter.prompts == []
    assert output.endswith("Command 0 result:\nConnected\n")
    assert h.shell.prompt == "mmcnett:ush> "


def test_connect_to_another_user_and_host_asks_for_that_password():
    h = Harness(sample_world(), password="secret")
    h.prompter.answer = "bobpw"
    h.run("connect bob@other.example.org:7400")
    assert h.prompter.prompts == ["Password: "]
    assert h.factory_calls == [("other.example.org", 7400, "bob", "bobpw")]
    assert h.shell.prompt == "bob:ush> "


def test_connect_wrong_password_reports_the_error():
    h = Harness(sample_world())
    h.prompter.answer = "wrong"
    output = h.run("connect")
    assert "Command 0 result:\nError: authentication failed\n" in output
    assert h.shell.prompt == "ush> "


def test_connect_cancelled_at_password_prompt_sends_nothing():
    h = Harness(sample_world())
    h.prompter.answer = None
    output = h.run("connect")
    assert "connect: cancelled" in output
    assert h.factory_calls == [] and h.world.calls == []


@pytest.mark.parametrize("target, message", [
    ("ctl:notaport", "invalid port 'notaport'"),
    ("ctl:70000", "invalid port '70000'"),
    ("@ctl", "empty user name"),
    ("bob@:7390", "missing host name"),
])
def test_connect_rejects_malformed_targets(target, message):
    h = Harness(sample_world())
    output = h.run(f"connect {target}")
    assert message in output
    assert h.factory_calls == [] and h.prompter.prompts == []


def test_connect_twice_is_refused():
    h = Harness(sample_world())
    h.connect()
    assert "already connected as mmcnett" in h.run("connect")
    assert len(h.factory_calls) == 1


def test_disconnect_and_reconnect():
    h = Harness(sample_world())
    h.connect()
    output = h.run("disconnect")
    assert "Command 1 result:\nDisconnected\n" in output
    assert h.shell.prompt == "ush> "
    assert "not connected; use 'connect' first" in h.run("list")
    h.world.vms[full("horton")]["state"] = "paused"  # changed while away
    output = h.run("reconnect")
    assert "Command 2 result:\nConnected\n" in output
    assert f"[notice] {full('horton')}: run -> paused" in output
    assert h.prompter.prompts == ["Password: "]  # not asked again
    assert len(h.factory_calls) == 1


def test_reconnect_before_connect_is_an_error():
    h = Harness()
    assert "never connected" in h.run("reconnect")


def test_commands_need_a_connection():
    h = Harness(sample_world())
    for line in ("list", "list_lnm", "start -n x -c 1", "pause horton", "migrate a b"):
        assert "not connected; use 'connect' first" in h.run(line)
    assert h.world.calls == []


# --- list and list_lnm -----------------------------------------------------------------

def test_list_selection_and_empty():
    world = sample_world()
    world.add(record("1.sneetch"))
    world.add(record("10.sneetch"))
    world.add(record("2.sneetch"))
    h = Harness(world)
    h.connect()
    output = h.run("list -n sneetch")
    names = re.findall(r"^(\S+\.mmcnett\S*)", output, re.M)
    assert names == [full("1.sneetch"), full("2.sneetch"), full("10.sneetch")]
    assert "3 VMs:" in output
    assert "1 VM:" in h.run("list horton")
    assert "0 VMs." in h.run("list -r nomatch")
    assert "Error: no such VM" in h.run("list nosuchvm")


def test_list_status_asks_the_controller_and_adds_columns():
    h = Harness(sample_world())
    h.connect()
    output = h.run("list -s")
    assert "<Command 1 result pending...>" in output
    header = [line for line in output.splitlines() if line.startswith("VM ")][0]
    assert header.split() == ["VM", "state", "LNM", "cluster", "memory", "vcpus", "cpu",
                              "percent"]
    assert "256 MiB" in output and "1.50" in output
    assert h.sent("list")[-1][1]["status"] is True


def test_list_all_is_a_remote_query_and_shows_owners_when_mixed():
    world = sample_world()
    world.add(record("web", user="bob"))
    world.admins.add(USER)
    h = Harness(world)
    h.connect()
    output = h.run("list -a")
    assert h.sent("list")[-1][1]["remote"] is True
    header = [line for line in output.splitlines() if line.startswith("VM ")][0]
    assert header.split() == ["VM", "owner", "state", "LNM"]


def test_list_lnm_table_and_patterns():
    h = Harness(sample_world())
    h.connect()
    output = h.run("list_lnm -s '~vmm4[34]'")
    assert "2 LNMs:" in output
    assert "measured free" in output and "8000 MiB" in output
    assert h.sent("list_lnm")[-1][1] == {"patterns": ["~vmm4[34]"], "status": True}
    assert "malformed regular expression" in h.run("list_lnm '~('")
    assert len(h.sent("list_lnm")) == 1


def test_list_lnm_marks_test_hosts_only_when_there_is_one():
    real = {"name": "vmm43", "vms": 1, "cpus": 8, "memory_mib": 8192, "connected": True,
            "test_host": False}
    fake = dict(real, name="lnm1", test_host=True)
    assert "TEST" not in ush.format_lnm_list([real])
    lines = ush.format_lnm_list([real, fake]).splitlines()
    assert lines[2].split()[-1] == "test"
    assert lines[4].split()[0] == "lnm1" and lines[4].split()[-1] == "TEST"
    assert lines[5].split()[0] == "vmm43" and lines[5].split()[-1] == "yes"


# --- start ------------------------------------------------------------------------------

def test_start_forms_and_arguments():
    h = Harness(sample_world())
    h.connect()
    h.run("start -n web -c 2 --arg memory_mib=1024 --arg image=centos5 vmm43 -l vmm44")
    assert h.sent("start")[-1][1] == {"names": [], "cluster": "web", "count": 2,
                                      "lnms": ["vmm43", "vmm44"],
                                      "args": {"memory_mib": 1024, "image": "centos5"}}
    h.run("start '[1-2].db' solo")
    assert h.sent("start")[-1][1]["names"] == ["[1-2].db", "solo"]
    assert h.sent("start")[-1][1]["count"] is None


@pytest.mark.parametrize("line, message", [
    ("start -n web", "-n CLUSTER needs -c COUNT"),
    ("start -c 3", "-c COUNT needs -n CLUSTER"),
    ("start -n web -c 0", "'0' is not a positive number"),
    ("start -n web -c many", "'many' is not a whole number"),
    ("start -n Web_1 -c 2", "invalid cluster name 'Web_1'"),
    ("start -n web -c 2 --arg memory", "--arg needs KEY=VALUE"),
    ("start -n web -c 2 --arg a=1 --arg a=2", "--arg a given twice"),
    ("start", "nothing to start"),
    ("start '[1-x].db'", "malformed range"),
    ("start bad_name", "invalid VM name label"),
    ("start -n web -c 2 '/(/'", "malformed regular expression"),
    ("start -n web -c 2 --bogus", "unrecognized arguments: --bogus"),
])
def test_start_usage_errors_send_nothing(line, message):
    h = Harness(sample_world())
    h.connect()
    output = h.run(line)
    assert message in output
    assert h.sent("start") == []
    assert "pending" not in output


def test_start_partial_failure_lists_both():
    world = sample_world()
    world.start_failures[full("2.web")] = "no LNM has room"
    h = Harness(world)
    h.connect()
    output = h.run("start -n web -c 3")
    assert "Controller started 2 VMs in 2 seconds:\n" in output
    assert f"Could not start 1 VM:\n{full('2.web')}: no LNM has room\n" in output


# --- Table 3 operations -------------------------------------------------------------------

def sneetch_world(count=5):
    world = sample_world()
    for i in range(1, count + 1):
        world.add(record(f"{i}.sneetch", lnm=f"vmm43.{DOMAIN}"))
    return world


@pytest.mark.parametrize("operation", states.OPERATIONS)
def test_operation_parsing(operation):
    h = Harness(sneetch_world())
    h.connect()
    h.run(f"{operation} '[1-3].sneetch' horton -n sneetch -n web -r '^usher\\.'")
    (method, kwargs), = h.sent("op_on")
    assert kwargs["operation"] == operation
    selection = kwargs["selection"]
    assert selection.names == ["1.sneetch", "2.sneetch", "3.sneetch", "horton"]
    assert selection.clusters == ["sneetch", "web"]
    assert selection.regex.pattern == "^usher\\."


@pytest.mark.parametrize("operation", states.OPERATIONS)
@pytest.mark.parametrize("arguments, message", [
    ("", "nothing selected"),
    ("-r '('", "malformed regular expression '('"),
    ("'[1-x].sneetch'", "malformed range [1-x]"),
    ("'[3-1].sneetch'", "empty range 3-1"),
    ("'[1-3.sneetch'", "unbalanced bracket"),
    ("-n Bad_Cluster", "invalid cluster name"),
    ("-r", "argument -r/--regex: expected one argument"),
    ("--frobnicate x", "unrecognized arguments: --frobnicate"),
])
def test_operation_usage_errors_send_nothing(operation, arguments, message):
    h = Harness(sneetch_world())
    h.connect()
    h.world.calls.clear()
    output = h.run(f"{operation} {arguments}")
    assert message in output
    assert f"{operation}:" in output
    assert h.world.calls == []
    assert "pending" not in output


def test_operation_result_and_notices():
    h = Harness(sneetch_world())
    h.connect()
    output = h.run("pause '[1-2].sneetch'")
    # Reported once, in the result: no [notice] echo of our own changes.
    assert output.splitlines()[1:] == [
        "<Command 1 result pending...>",
        "Command 1 result:",
        "Controller paused 2 VMs:",
        f"{full('1.sneetch')} -> paused",
        f"{full('2.sneetch')} -> paused",
    ]
    output = h.run("resume '[1-3].sneetch'")
    assert "Controller resumed 2 VMs:" in output
    assert f"Could not resume 1 VM:\n{full('3.sneetch')}: cannot resume a VM in state run" \
        in output
    output = h.run("destroy 5.sneetch")
    assert "[notice]" not in output
    assert f"Controller destroyed 1 VM:\n{full('5.sneetch')} -> shutoff" in output
    output = h.run("delete 5.sneetch")
    assert "[notice]" not in output
    assert f"{full('5.sneetch')} deleted" in output


class Confirmer:
    """The console's confirm, answering from a list."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.asked = []

    def confirm(self, prompt):
        self.asked.append(prompt)
        return defer.succeed(self.answers.pop(0))


@pytest.mark.parametrize("operation", states.DESTRUCTIVE_OPERATIONS)
def test_destructive_operations_on_several_vms_ask_first(operation):
    h = Harness(sneetch_world(count=12))
    h.connect()
    h.shell.confirmer = confirmer = Confirmer(False, True)
    output = h.run(f"{operation} -n sneetch")
    assert confirmer.asked == [
        f"{operation} 12 VMs of mmcnett (1.sneetch, 2.sneetch, 3.sneetch … 12.sneetch)? [y/N] "]
    assert f"{operation}: cancelled" in output
    assert h.sent("op_on") == []
    h.run(f"{operation} '[1-4].sneetch'")
    assert confirmer.asked[1] == (f"{operation} 4 VMs of mmcnett (1.sneetch, 2.sneetch, "
                                  "3.sneetch, 4.sneetch)? [y/N] ")
    assert len(h.sent("op_on")) == 1
    # One VM, or -y: no question.
    h.run(f"{operation} 5.sneetch")
    h.run(f"{operation} --yes '[6-7].sneetch'")
    assert len(confirmer.asked) == 2 and len(h.sent("op_on")) == 3


@pytest.mark.parametrize("operation", ["destroy", "delete"])
def test_an_administrators_selection_by_lnm_asks_with_the_controllers_list(operation):
    """The cache holds the administrator's own VMs; the controller picks
    every user's on the LNM: the question counts those (a remote list)."""
    world = sneetch_world(count=0)
    world.admins.add(USER)
    for i in (1, 2, 3):
        world.add(record(f"{i}.web", lnm=f"vmm44.{DOMAIN}", user="bob"))
    h = Harness(world)
    client = h.connect()
    client.vms = {n: r for n, r in client.vms.items() if r["owner"] == USER}
    h.shell.confirmer = confirmer = Confirmer(False)
    lnm = f"vmm44.{DOMAIN}"
    output = h.run(f"{operation} --force --lnm {lnm}" if operation == "delete"
                   else f"{operation} --lnm {lnm}")
    assert confirmer.asked == [
        f"{operation} 3 VMs of bob (1.web, 2.web, 3.web)? [y/N] "]
    assert f"{operation}: cancelled" in output
    assert h.sent("op_on") == []
    # The list cannot be had: asked all the same.
    h.shell.confirmer = confirmer = Confirmer(False)
    client.list = lambda *a, **kw: defer.fail(Unavailable("the controller is busy"))
    h.run(f"{operation} --lnm {lnm}")
    assert confirmer.asked == [f"{operation} every VM of the selection on LNM {lnm} (they "
                               "could not be listed: the controller is busy)? [y/N] "]
    assert h.sent("op_on") == []


def test_delete_force_is_sent_as_an_argument():
    h = Harness(sneetch_world())
    h.connect()
    output = h.run("delete 1.sneetch")
    assert "cannot delete a VM in state run" in output
    output = h.run("delete --force -y '[1-2].sneetch'")
    assert "Controller deleted 2 VMs" in output
    assert [c[1]["args"] for c in h.sent("op_on")] == [None, {"force": True}]
    assert "--force" in h.run("delete -h")


def test_operation_on_unknown_vm_reports_the_controller_error():
    h = Harness(sneetch_world())
    h.connect()
    output = h.run("reboot 99.sneetch")
    assert f"Command 1 result:\nError: no such VM: {full('99.sneetch')}" in output


# --- migrate -------------------------------------------------------------------------------

def test_migrate_one_vm_to_one_lnm():
    h = Harness(sneetch_world())
    h.connect()
    output = h.run(f"migrate 1.sneetch vmm47.{DOMAIN}")
    (_, kwargs), = h.sent("migrate")
    assert kwargs["selection"].names == ["1.sneetch"]
    assert kwargs["lnms"] == [f"vmm47.{DOMAIN}"]
    assert (f"{full('1.sneetch')} moved from vmm43.{DOMAIN} to vmm47.{DOMAIN}") in output
    assert "[notice]" not in output         # the result says it


def test_migrate_selection_to_several_lnms():
    h = Harness(sneetch_world())
    h.connect()
    output = h.run("migrate -n sneetch -r horton '[1-2].sneetch' --to '~vmm4[47]' vmm43."
                   + DOMAIN)
    (_, kwargs), = h.sent("migrate")
    assert kwargs["selection"].clusters == ["sneetch"]
    assert kwargs["selection"].names == ["1.sneetch", "2.sneetch"]
    assert kwargs["selection"].regex.pattern == "horton"
    assert kwargs["lnms"] == ["~vmm4[47]", f"vmm43.{DOMAIN}"]
    assert "Controller migrated 6 VMs:" in output


@pytest.mark.parametrize("line, message", [
    ("migrate 1.sneetch", "give one VM and one LNM"),
    ("migrate 1.sneetch 2.sneetch vmm47", "give one VM and one LNM"),
    ("migrate -n sneetch vmm47", "give one VM and one LNM"),
    ("migrate -n sneetch --to", "argument --to: expected at least one argument"),
    ("migrate --to vmm47", "nothing selected"),
    ("migrate 1.sneetch '/(/'", "malformed regular expression"),
    ("migrate -r '[' --to vmm47", "malformed regular expression"),
    ("migrate '[a-b].sneetch' vmm47", "malformed range"),
])
def test_migrate_usage_errors_send_nothing(line, message):
    h = Harness(sneetch_world())
    h.connect()
    output = h.run(line)
    assert message in output
    assert h.sent("migrate") == []


# --- notices --------------------------------------------------------------------------------

def test_notices_for_changes_made_elsewhere():
    h = Harness(sneetch_world())
    client = h.connect()
    h.out.truncate(0), h.out.seek(0)
    horton = dict(client.vms[full("horton")])
    client.fire_changes([dict(horton, state="paused")])
    client.fire_changes([dict(horton, state="paused", version=2)])  # nothing visible
    client.fire_changes([dict(horton, state="migrating")])
    client.fire_changes([dict(horton, state="run", lnm="vmm99")])
    client.fire_changes([record("new", lnm="vmm44")])
    client.fire_changes([], [full("new")])
    assert h.out.getvalue().splitlines() == [
        f"[notice] {full('horton')}: run -> paused",
        f"[notice] {full('horton')}: paused -> migrating",
        f"[notice] {full('horton')}: migrating -> run (moved vmm47.{DOMAIN} -> vmm99)",
        f"[notice] {full('new')}: new VM, run on vmm44",
        f"[notice] {full('new')}: removed",
    ]


def test_own_commands_changes_are_reported_once_and_others_notices_wait_for_the_result():
    h = Harness(sneetch_world())
    client = h.connect()
    h.world.hold = True
    output = h.run("pause '[1-2].sneetch'")
    assert output.splitlines()[1:] == ["<Command 1 result pending...>"]
    # Someone else pauses 3.sneetch while ours is under way: held, not lost.
    client.fire_changes([dict(h.world.vms[full("3.sneetch")], state="paused")])
    assert "[notice]" not in h.out.getvalue()
    start = len(h.out.getvalue())
    h.world.release()
    output = h.out.getvalue()[start:]
    assert output.index("Command 1 result:") < output.index(
        f"[notice] {full('3.sneetch')}: run -> paused")
    assert output.count("[notice]") == 1
    # A late notice of what the result already said is not printed either.
    h.world.hold = False
    client.fire_changes([dict(h.world.vms[full("1.sneetch")], state="paused")])
    assert h.out.getvalue().count("[notice]") == 1


def test_one_shot_on_a_terminal_shows_progress_on_one_line_then_the_result():
    world = sneetch_world()
    out = io.StringIO()
    shell = ush.Shell(lambda **kw: FakeClient(world, **kw), settings(password="secret"),
                      out=out, clock=task.Clock())
    shell.live_output = True
    world.hold = True
    done = []
    defer.Deferred.fromCoroutine(shell.run_once(["pause", "-n", "sneetch"])).addBoth(
        done.append)
    world.release()                                     # connect
    client = world.clients[-1]
    for i in (1, 2, 3):
        client.fire_changes([dict(world.vms[full(f"{i}.sneetch")], state="paused")])
        if i > 1:
            shell.clock.advance(0.1)            # at most ten redraws a second
    assert out.getvalue() == ("\r\x1b[Kpause: 1 paused, 0 in progress so far"
                              "\r\x1b[Kpause: 3 paused, 0 in progress so far")
    for i in (1, 2, 3):             # (the fake controller checks states in the cache)
        client.vms[full(f"{i}.sneetch")]["state"] = "run"
    world.release()                                     # the pause
    assert done == [0]
    # The line is erased before the result, which stays.
    assert out.getvalue().endswith("so far\r\x1b[KController paused 5 VMs:\n" + "\n".join(
        f"{full(f'{i}.sneetch')} -> paused" for i in range(1, 6)) + "\n")
    # Not on a terminal (nor with --json): no progress line.
    out = io.StringIO()
    shell = ush.Shell(lambda **kw: FakeClient(sneetch_world(), **kw),
                      settings(password="secret"), out=out, clock=task.Clock())
    assert fired(defer.Deferred.fromCoroutine(shell.run_once(["resume", "-n", "sneetch"])))
    assert "\r" not in out.getvalue()


def test_notices_off_and_on():
    h = Harness(sneetch_world())
    client = h.connect()
    assert "Notices are off" in h.run("notices off")
    client.fire_changes([dict(h.world.vms[full("3.sneetch")], state="paused")])
    assert "[notice]" not in h.out.getvalue()
    assert "Notices are on" in h.run("notices on")
    client.fire_changes([dict(h.world.vms[full("4.sneetch")], state="paused")])
    assert f"[notice] {full('4.sneetch')}: run -> paused" in h.out.getvalue()
    assert "Notices are on" in h.run("notices")
    h = Harness(sneetch_world(), settings_overrides={"notices": False})
    client = h.connect()
    client.fire_changes([dict(h.world.vms[full("3.sneetch")], state="paused")])
    assert "[notice]" not in h.out.getvalue()


def test_results_of_many_vms_group_reasons_and_name_ranges():
    world = sneetch_world(0)
    for i in range(13, 31):
        world.start_failures[full(f"{i}.big")] = "no LNM can start it: lnm1: memory full"
    world.start_failures[full("31.big")] = (f"LNM lnm1 disconnected before {full('31.big')} "
                                            "could be started")
    h = Harness(world)
    h.connect()
    output = h.run("start -n big -c 31")
    lines = output.splitlines()[3:]
    assert lines[0].startswith("Controller started 12 VMs in 2 seconds: [1-12].big (")
    assert lines[1:] == [
        "Could not start 19 VMs:",
        "  18 VMs ([13-30].big): no LNM can start it: lnm1: memory full",
        "  1 VM (31.big): LNM lnm1 disconnected before the VM could be started",
        "(-v lists each VM)"]
    output = h.run("pause -v -n big")
    assert output.count("-> paused") == 12
    output = h.run("resume -n big")
    assert "Controller resumed 12 VMs: [1-12].big -> run" in output
    assert len(output.splitlines()) == 5 and "(-v lists each VM)" in output


def test_connection_notices():
    h = Harness(sneetch_world())
    client = h.connect()
    h.out.truncate(0), h.out.seek(0)
    client.fire_connection("reconnecting", "lost the controller at ctl:7390; reconnecting")
    client.fire_connection("connected", "reconnected to ctl:7390")
    client.fire_connection("notice", "maintenance: vmm43 goes down at 18:00")
    client.fire_connection("disconnected", "")
    assert h.out.getvalue().splitlines() == [
        "[notice] lost the controller at ctl:7390; reconnecting",
        "[notice] reconnected to ctl:7390",
        "[notice] maintenance: vmm43 goes down at 18:00",
        "[notice] disconnected from the controller",
    ]


def test_no_notices_for_the_initial_vm_list():
    h = Harness(sneetch_world())
    assert "[notice]" not in h.run("connect")


# --- help -------------------------------------------------------------------------------------

ALL_COMMANDS = ["connect", "disconnect", "reconnect", "list", "list_lnm", "start",
                *states.OPERATIONS, "migrate", "ranges", "addresses", "help", "quit"]


def test_help_overview_lists_every_command_and_topic():
    h = Harness()
    output = h.run("help")
    for name in ALL_COMMANDS + list(ush_help.TOPICS):
        assert re.search(rf"^  {name} ", output, re.M), name
    assert h.run("?") == h.run("help").replace("help", "?", 1)


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_help_for_every_command(name):
    h = Harness()
    output = h.run(f"help {name}")
    assert output.splitlines()[1].startswith(f"usage: {name}")
    assert h.run(f"? {name}").splitlines()[1:] == output.splitlines()[1:]
    assert h.run(f"{name} -h").splitlines()[1:] == output.splitlines()[1:]
    # Every option the parser accepts is explained in the help text.
    parser = ush.build_parsers()[name]
    for action in parser._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert re.search(rf"(^|[\s\[(,]){re.escape(option)}\b", output), option


def test_help_topics_and_unknown():
    h = Harness()
    for topic in ush_help.TOPICS:
        assert h.run(f"help {topic}").splitlines()[1].startswith(f"{topic}: ")
    assert "no help on 'nosuch'" in h.run("help nosuch")


def test_online_help_is_extensive():
    lines = sum(len(ush_help.render(name).splitlines())
                for name in [*ush_help.COMMANDS, *ush_help.TOPICS])
    assert lines > 400


def test_unknown_command_and_bad_quoting():
    h = Harness()
    assert "unknown command 'frob'" in h.run("frob")
    assert "cannot split the line" in h.run("list 'unclosed")
    assert h.run("") == "ush> \n"
    assert h.run("# a comment") == "ush> # a comment\n"


def test_completion():
    h = Harness(sneetch_world())
    h.connect()
    assert h.shell.complete("li", "") == ["list", "list_lnm"]
    assert h.shell.complete("1.", "pause ") == ["1.sneetch"]
    assert h.shell.complete("sn", "pause -n ") == ["sneetch"]
    assert h.shell.complete("st", "help ") == ["start", "states"]


# --- formatting ------------------------------------------------------------------------------

def test_natural_sort_and_durations():
    assert sorted(["10.a", "9.a", "1.a"], key=ush.natural_key) == ["1.a", "9.a", "10.a"]
    assert ush.format_duration(2.4) == " in 2 seconds"
    assert ush.format_duration(1.0) == " in 1 second"
    assert ush.format_duration(0.25) == " in 0.2 seconds"


def test_lnm_status_figures_nested_in_a_status_dict_become_columns():
    lnm = {"name": "vmm1", "vms": 2, "cpus": 8, "memory_mib": 16384, "connected": True,
           "model": "m", "status": {"free_memory_mib": 900, "load_1": 0.25}}
    header, _, row = ush.format_lnm_list([lnm], status=True).splitlines()[2:5]
    assert header.split() == ["LNM", "VMs", "CPUs", "memory", "connected", "measured", "free",
                              "load", "1", "model"]
    assert "900 MiB" in row and "0.25" in row
    # Without figures there is no empty "measured free" column.
    del lnm["status"]
    assert "measured free" not in ush.format_lnm_list([lnm], status=True)


def test_status_columns_follow_new_fields():
    rec = record("a", load_1=0.5, tx_rate=12)
    text = ush.format_vm_list([rec], status=True)
    header = text.splitlines()[2]
    assert header.split()[-4:] == ["load", "1", "tx", "rate"]
    assert "0.50" in text


# --- one-shot mode ---------------------------------------------------------------------------

class OneShot:
    def __init__(self, world=None, password="secret", loader=None):
        self.world = world or sneetch_world()
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.password_prompts = []
        self.factory_calls = []
        self.settings = settings(password=password)
        self.loader = loader or (lambda *_files, **_how: self.settings)

    def factory(self, host, port, username, password):
        self.factory_calls.append((host, port, username, password))
        return FakeClient(self.world, host, port, username, password)

    def getpass(self, prompt):
        self.password_prompts.append(prompt)
        return "secret"

    def __call__(self, *argv):
        return ush.run(list(argv), stdout=self.stdout, stderr=self.stderr,
                       settings_loader=self.loader, client_factory=self.factory,
                       reactor=task.Clock(), getpass_fn=self.getpass)

    def json(self):
        return json.loads(self.stdout.getvalue())


def test_one_shot_list_json():
    run = OneShot()
    assert run("--json", "list", "-n", "sneetch") == 0
    data = run.json()
    assert [vm["name"] for vm in data] == [full(f"{i}.sneetch") for i in range(1, 6)]
    for vm in data:
        assert {"name", "state", "lnm", "cluster", "owner"} <= set(vm)
    assert run.password_prompts == []  # the configuration has the password
    assert run.world.calls[-1] == ("disconnect", {})


def test_one_shot_list_text():
    run = OneShot()
    assert run("list", "horton") == 0
    assert run.stdout.getvalue().startswith("1 VM:\n-----\nVM ")
    assert "Command" not in run.stdout.getvalue()


def test_one_shot_prompts_for_a_missing_password_once():
    run = OneShot(password=None)
    assert run("list") == 0
    assert run.password_prompts == ["Password: "]


def test_one_shot_list_lnm_json():
    run = OneShot()
    assert run("--json", "list_lnm") == 0
    data = run.json()
    assert [lnm["name"] for lnm in data] == [f"vmm{n}.{DOMAIN}" for n in (43, 44, 47)]
    assert all("vms" in lnm for lnm in data)


def test_one_shot_start_json_with_failures():
    world = sneetch_world(0)
    world.start_failures[full("2.web")] = "no room"
    run = OneShot(world)
    assert run("--json", "start", "-n", "web", "-c", "3") == 1
    assert run.json() == [{"name": full("1.web"), "lnm": f"vmm43.{DOMAIN}"},
                          {"name": full("3.web"), "lnm": f"vmm47.{DOMAIN}"},
                          {"name": full("2.web"), "error": "no room", "code": "operation_failed"}]


def test_one_shot_start_success():
    run = OneShot(sneetch_world(0))
    assert run("start", "-n", "web", "-c", "2") == 0
    assert run.stdout.getvalue().startswith("Controller started 2 VMs in 2 seconds:\n")


def test_one_shot_operation_json_and_exit_codes():
    run = OneShot()
    assert run("--json", "pause", "[1-2].sneetch") == 0
    assert run.json() == {"done": [{"name": full("1.sneetch"), "state": "paused"},
                                   {"name": full("2.sneetch"), "state": "paused"}],
                          "failed": [], "notes": []}
    assert "[notice]" not in run.stdout.getvalue()
    run = OneShot()
    assert run("--json", "resume", "1.sneetch") == 1
    assert run.json()["failed"][0]["name"] == full("1.sneetch")
    run = OneShot()
    assert run("resume", "1.sneetch") == 1
    assert "Could not resume 1 VM" in run.stdout.getvalue()


def test_one_shot_migrate_json():
    run = OneShot()
    assert run("--json", "migrate", "1.sneetch", f"vmm47.{DOMAIN}") == 0
    assert run.json()["migrated"] == [{"name": full("1.sneetch"), "from": f"vmm43.{DOMAIN}",
                                       "to": f"vmm47.{DOMAIN}"}]


def test_one_shot_usage_errors_exit_2_without_connecting():
    for argv in (["pause"], ["pause", "-r", "("], ["frob"], ["start", "-n", "x"],
                 ["disconnect"], ["quit"]):
        run = OneShot(password=None)
        assert run("--json", *argv) == 2, argv
        assert "error" in run.json()
        assert run.factory_calls == [] and run.password_prompts == []
    run = OneShot()
    assert run("pause", "-r", "(") == 2
    assert "malformed regular expression" in run.stderr.getvalue()
    assert run.stdout.getvalue() == ""


def test_one_shot_connection_errors_exit_3():
    run = OneShot(password="wrong")
    assert run("--json", "list") == 3
    assert run.json() == {"error": "authentication failed", "code": "authentication_failed"}
    world = sneetch_world()
    world.reachable = False
    run = OneShot(world)
    assert run("list") == 3
    assert "cannot reach the controller" in run.stderr.getvalue()


def test_one_shot_unknown_vm_exits_4():
    run = OneShot()
    assert run("--json", "shutdown", "nosuch") == 4
    assert run.json() == {"error": f"no such VM: {full('nosuch')}", "code": "no_such_vm"}


def test_one_shot_help_needs_no_connection():
    run = OneShot(password=None)
    assert run("help", "start") == 0
    assert run.stdout.getvalue().startswith("usage: start -n CLUSTER -c COUNT")
    assert run.factory_calls == []
    run = OneShot()
    assert run("--json", "list", "-h") == 0
    assert run.json()["help"].startswith("usage: list")


def test_one_shot_connect():
    run = OneShot()
    assert run("--json", "connect") == 0
    assert run.json() == {"user": USER, "admin": False, "domain": DOMAIN}


def test_invalid_configuration_exits_2_with_one_line():
    def broken(paths, isolated=False):
        raise ConfigError("/home/a/.usher/ush.config:4: [ush] controller_port: 'x' is "
                          "not an integer")
    run = OneShot(loader=broken)
    assert run("list") == 2
    assert run.stderr.getvalue() == ("ush: /home/a/.usher/ush.config:4: [ush] "
                                     "controller_port: 'x' is not an integer\n")
    run = OneShot(loader=broken)
    assert run("--json", "list") == 2
    assert "controller_port" in run.json()["error"]


def test_config_file_is_passed_to_the_loader():
    seen = []
    run = OneShot()
    run.loader = lambda paths, isolated: seen.append((paths, isolated)) or run.settings
    run("--config", "/tmp/my.config", "help")
    run("--isolated", "--config", "/tmp/a.config", "--config", "/tmp/b.config", "help")
    assert seen == [(["/tmp/my.config"], False), (["/tmp/a.config", "/tmp/b.config"], True)]


def test_settings_from_loaded_configuration(tmp_path):
    path = tmp_path / "ush.config"
    path.write_text("[ush]\ncontroller_host = ctl.example.org\npassword = pw\n"
                    "clusters = a, b\n")
    loaded = ush.load_settings(str(path))
    assert loaded.controller_host == "ctl.example.org"
    assert loaded.password == "pw"
    assert loaded.clusters == ["a", "b"]
    path.write_text("[ush]\ncontroller_prot = 1\n")
    with pytest.raises(ConfigError, match="controller_prot"):
        ush.load_settings(str(path))


# --- the terminal side ------------------------------------------------------------------------

class SyncReactor:
    """callFromThread runs at once: the Console's two threads become one."""

    def callFromThread(self, f, *args):
        f(*args)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def console_session(world, typed, confirming=False, on_prompt=None):
    """Run the Console's loop over the lines ``typed`` (then end of input)
    -> (the prompts it showed, what it wrote). ``on_prompt(console, prompts)``
    runs before each line is read."""
    stdout = FakeTerminal()
    lines = iter(typed)
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        if on_prompt is not None:
            on_prompt(console, prompts)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    console = ush.Console(SyncReactor(), stdout=stdout, input_fn=read,
                          getpass_fn=lambda prompt: "secret", interactive=True)
    shell = ush.Shell(lambda **kw: FakeClient(world, **kw), settings(), out=console,
                      prompter=console, clock=task.Clock())
    if confirming:
        shell.confirmer = console
    console.loop(shell)
    return prompts, stdout.getvalue()


def test_console_loop_drives_the_shell():
    world = sample_world()
    prompts, output = console_session(world, ["connect", "list", "pause horton"])
    assert prompts == ["ush> ", "mmcnett:ush> ", "mmcnett:ush> ", "mmcnett:ush> "]
    assert "Command 0 result:\nConnected\n" in output
    assert "2 VMs:" in output
    assert f"{full('horton')} -> paused" in output
    assert "[notice]" not in output         # our own pause: its result says it


def test_console_ctrl_c_at_password_prompt_cancels():
    world = sample_world()
    lines = iter(["connect"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    def interrupted(prompt):
        raise KeyboardInterrupt
    stdout = FakeTerminal()
    console = ush.Console(SyncReactor(), stdout=stdout, input_fn=read,
                          getpass_fn=interrupted, interactive=True)
    shell = ush.Shell(lambda **kw: FakeClient(world, **kw), settings(), out=console,
                      prompter=console, clock=task.Clock())
    console.loop(shell)
    assert "connect: cancelled" in stdout.getvalue()
    assert world.calls == []


def test_console_redraws_the_prompt_under_asynchronous_output():
    class Readline:
        @staticmethod
        def get_line_buffer():
            return "pau"
    stdout = FakeTerminal()
    console = ush.Console(SyncReactor(), stdout=stdout, interactive=True,
                          readline_module=Readline)
    console.shell = Harness().shell
    console._reading_prompt = "ush> "
    console.write("[notice] x: run -> paused\n")
    assert stdout.getvalue() == "\r\x1b[K[notice] x: run -> paused\nush> pau"
    console._reading_prompt = None
    console.write("plain\n")
    assert stdout.getvalue().endswith("ush> pauplain\n")


def test_console_confirmation_is_read_in_the_loop_and_notices_redraw_the_question():
    world = sneetch_world()

    def notice_under_the_question(console, prompts):
        if "[y/N]" in prompts[-1] and len(prompts) == 3:
            # A notice arriving while the question is up redraws the question.
            console.write("[notice] something happened\n")
    prompts, output = console_session(
        world, ["connect", "destroy -n sneetch", "n", "destroy '[1-2].sneetch'", "yes"],
        confirming=True, on_prompt=notice_under_the_question)
    question = ("destroy 5 VMs of mmcnett (1.sneetch, 2.sneetch, 3.sneetch … 5.sneetch)? "
                "[y/N] ")
    assert prompts[:4] == ["ush> ", "mmcnett:ush> ", question, "mmcnett:ush> "]
    assert prompts[4] == "destroy 2 VMs of mmcnett (1.sneetch, 2.sneetch)? [y/N] "
    assert "\r\x1b[K[notice] something happened\n" + question in output
    assert "destroy: cancelled" in output
    assert "Controller destroyed 2 VMs:" in output
    assert [c[1]["selection"].names for c in world.calls if c[0] == "op_on"] == [
        ["1.sneetch", "2.sneetch"]]


def test_an_evacuation_of_many_vms_is_summed_up_by_target_and_reason():
    from usher.clients.ush.cmd_hosts import format_status
    moved = [{"name": f"{i}.big", "to": "vmm2" if i % 2 else "vmm3"} for i in range(1, 21)]
    failed = [{"name": f"{i}.big", "error": "no LNM can migrate it"} for i in range(21, 41)]
    text = format_status({"lnm": "vmm1", "maintenance": True, "done": True, "total": 40,
                          "moved": moved, "failed": failed})
    assert text.splitlines()[2:] == [
        "Moved:",
        "  10 VMs ([1,3,5,7,9,11,13,15,17,19].big) -> vmm2",
        "  10 VMs ([2,4,6,8,10,12,14,16,18,20].big) -> vmm3",
        "Could not move:",
        "  20 VMs ([21-40].big): no LNM can migrate it",
        "(ush --json evacuation LNM lists each VM)"]

"""A bounded, seeded fuzz of the controller's PB surface (issue 10).

Every method of the pre-login root (``login``) and of a user's perspective
(every ``perspective_*`` of ``UserPerspective``) is called through a real
PB connection over TLS (the in-process ClientGrid: the controller, its
client port and authentication chain as in production) with generated
hostile arguments — wrong types, huge and negative integers, NaN, long and
odd strings, bytes, nested structures, unknown keywords — and hand-made
jelly the client library would never send (classes, modules, functions,
instances). Every call must end with an Usher error or a valid answer; the
log must show no unhandled error and nothing unbounded; the controller must
keep serving: another user's session answers at the end, unchanged.
"""

import inspect
import random

import pytest_twisted
from twisted.internet import defer
from twisted.spread import pb
from twisted.spread.banana import BananaError
from twisted.spread.jelly import InsecureJelly

from usher.controller.client_link import UserPerspective
from usher.controller.client_login import LoginGateway
from usher.auth.throttle import ThrottlePolicy
from usher import states
from usher.settings import default_plugin_registrations
from usher.states import OPERATIONS

from tests.clientgrid import PASSWORDS
from tests.e2e import wait_for
from tests.grid import DOMAIN
from tests.hostile import LogCapture, connect_pb, remote_type

SEED = 20240610
CALLS_PER_METHOD = 25       # 12 perspective methods + login: ~330 calls
ROOT_CALLS = 30

PERSPECTIVE_METHODS = sorted(name.removeprefix("perspective_")
                             for name in vars(UserPerspective)
                             if name.startswith("perspective_"))
ROOT_METHODS = sorted(name.removeprefix("remote_") for name in vars(LoginGateway)
                      if name.startswith("remote_"))

# Words that reach deeper than random text: selection keys, request args,
# operations, plugin and event names, LNM names.
WORDS = ["names", "clusters", "regex", "everything", "cluster", "count", "memory_mib",
         "vcpus", "os", "lnms", "guaranteed", "limits", "open_authz", "start_request",
         "timer", "lnm1", "lnm2", "1.fuzz", "fuzz", "[1-3].fuzz", "[1-99999999].x", "*",
         ".*", "(a+)+$", "bob", "1.bobs.bob.usher.test"] + list(OPERATIONS)


def text(r):
    choice = r.randrange(8)
    if choice == 0:
        return ""
    if choice == 1:
        return r.choice(WORDS)
    if choice == 2:
        return "".join(r.choice("abc.-_[]0123456789") for _ in range(r.randrange(1, 40)))
    if choice == 3:
        return "é☃\u202e\x00\n\udcff"[: r.randrange(1, 7)] * r.randrange(1, 50)
    if choice == 4:
        return "x" * r.choice([255, 4096, 65_536, 200_000])
    if choice == 5:
        return "/" + "/".join(r.choice(["etc", "..", "shadow", "dev", "null"])
                              for _ in range(r.randrange(1, 6)))
    if choice == 6:
        return "%s" * r.randrange(1, 30) + "{0}{user}"
    return str(r.randrange(-10**6, 10**6))


def number(r):
    return r.choice([0, -1, 1, 2, 3, 255, 2**31, -2**31 - 1, 2**63, -2**63, 10**18,
                     2**400, -2**400, r.randrange(-10**9, 10**9), 0.5, -0.0,
                     float("inf"), float("-inf"), float("nan"), 1e308, True, False])


def value(r, depth=0):
    """One hostile value: anything PB's jelly carries."""
    choice = r.randrange(12 if depth < 6 else 5)
    if choice == 0:
        return None
    if choice in (1, 2):
        return text(r)
    if choice == 3:
        return number(r)
    if choice == 4:
        return text(r).encode("utf-8", "surrogatepass")
    if choice in (5, 6):
        return [value(r, depth + 1) for _ in range(r.randrange(0, 8))]
    if choice == 7:
        return tuple(value(r, depth + 1) for _ in range(r.randrange(0, 4)))
    if choice in (8, 9):
        return {r.choice(WORDS) if r.random() < 0.7 else text(r): value(r, depth + 1)
                for _ in range(r.randrange(0, 6))}
    if choice == 10:
        return {number(r) if r.random() < 0.5 else (1, 2): value(r, depth + 1)}
    deep = None
    for _ in range(r.choice([50, 300])):
        deep = [deep]
    return deep


def arguments(r):
    """Positional and keyword arguments for one call: often the right count,
    sometimes too many, sometimes unknown keywords."""
    args = [value(r) for _ in range(r.choice([0, 1, 1, 2, 2, 3, 3, 4, 6]))]
    kwargs = {}
    if r.random() < 0.2:
        kwargs[r.choice(["source", "observer", "status", "extra", "k" * 100])] = value(r)
    return args, kwargs


# Jelly the client library never sends: what an attacker writing raw PB can.
HOSTILE_JELLY = [
    ["list", ["instance", ["class", "os.system"], ["dictionary"]]],
    ["list", ["module", "os"]],
    ["list", ["function", "os.system"]],
    ["list", ["class", "subprocess.Popen"]],
    ["list", ["unpersistable", "x" * 1000]],
    ["list", ["copy", "usher.errors.InvalidRequest", ["dictionary"]]],
    ["list", ["remote", 99999]],
    ["list", ["local", 99999]],
    ["list", ["cached", 99999]],
    ["list", ["dereference", 12345]],
    ["list", ["no-such-type", 1, 2, 3]],
    ["list", ["dictionary", [["list"], 1]]],
    ["list", ["tuple", ["set", 1, 2]]],
    ["tuple"],
    ["dictionary", ["k", "v"]],
    "not a list",
    12345,
]


# What our own side refuses to send (banana's limits, jelly's types, text
# that is not UTF-8, structures too deep for jelly): nothing left.
LOCAL_REFUSALS = (BananaError, InsecureJelly, UnicodeEncodeError, RecursionError)


def acceptable(failure):
    """An Usher error from the controller (not its "internal error"), or a
    call our side refused to send."""
    if not isinstance(failure.type, (str, bytes)):
        return failure.check(*LOCAL_REFUSALS) is not None
    return remote_type(failure).startswith("usher.errors.") and \
        "internal error" not in str(failure.value)


# Requests with which an administrator acts on every user's VMs, by design.
ADMIN_ON_ANYONE = {"start", "op_on", "migrate"}


def default_plugins(grid):
    grid.registry.unregister_all()
    grid.registry.register_configured(default_plugin_registrations())


async def settle(calls):
    return await defer.DeferredList(calls, consumeErrors=True)


async def call_all(target, method, r, count, *, pipeline=5):
    """``count`` generated calls of ``method`` on ``target``, a few at a time
    -> [(args, kwargs, (ok, result or failure))]."""
    done = []
    for start in range(0, count, pipeline):
        batch = [arguments(r) for _ in range(min(pipeline, count - start))]
        calls = [defer.maybeDeferred(target.callRemote, method, *args, **kwargs)
                 for args, kwargs in batch]
        for (args, kwargs), result in zip(batch, await settle(calls)):
            done.append((args, kwargs, result))
    return done


def short(args, kwargs):
    return repr((args, kwargs))[:300]


@pytest_twisted.ensureDeferred
async def test_fuzz_the_pb_surface(client_grids):
    # Logins are fuzzed too: no back-off in the way of the run.
    grid = await client_grids(throttle_policy=ThrottlePolicy(source_failures=10**6,
                                                             user_free_failures=10**6))
    port, ca = grid.port.getHost().port, grid.ca_file
    bob = await grid.connected("bob")
    await bob.start(["bobs"])
    await wait_for(lambda: bob.vms.get(f"bobs.bob.{DOMAIN}", {}).get("state") == states.RUN)
    bob_before = sorted((n, r["state"], r["lnm"]) for n, r in bob.vms.items())
    r = random.Random(SEED)
    outcomes = []
    assert "login" in ROOT_METHODS and len(PERSPECTIVE_METHODS) >= 12

    with LogCapture() as logged:
        # The pre-login root: a fresh connection whenever one is closed (after
        # five refused logins, by design).
        raw = await connect_pb(port, ca)
        for method in ROOT_METHODS + ["no_such_method", "__init__", "login\x00"]:
            done = 0
            while done < ROOT_CALLS:
                if not raw.connected:
                    raw = await connect_pb(port, ca)
                for args, kwargs, (ok, result) in await call_all(raw.root, method, r, 5):
                    done += 1
                    if ok:
                        assert isinstance(result, pb.RemoteReference), short(args, kwargs)
                    elif not result.check(pb.PBConnectionLost, pb.DeadReferenceError):
                        assert acceptable(result), (method, short(args, kwargs), result)
                    outcomes.append(ok)
        await raw.close()

        # Every perspective method, as an administrator (but for the requests
        # an administrator may make on anyone's VMs) and as an ordinary user.
        for user in ("root", "alice"):
            raw = await connect_pb(port, ca)
            perspective = await raw.root.callRemote("login", user, PASSWORDS[user], None)
            methods = [m for m in PERSPECTIVE_METHODS
                       if user == "alice" or m not in ADMIN_ON_ANYONE]
            for method in methods + ["no_such_method", "logout", "_push"]:
                for args, kwargs, (ok, result) in await call_all(perspective, method, r,
                                                                 CALLS_PER_METHOD):
                    assert ok or acceptable(result), (user, method, short(args, kwargs),
                                                      result)
                    outcomes.append(ok)
            # Hand-made jelly to the root and to the perspective.
            for target, method in ((perspective.luid, "list"), (perspective.luid, "start"),
                                   (perspective.luid, "op_on"), ("root", "login")):
                for sexp in HOSTILE_JELLY:
                    for net_args, net_kw in ((sexp, None), (["list"], sexp)):
                        ok, result = (await settle([raw.send(target, method, net_args,
                                                             net_kw)]))[0]
                        assert ok or acceptable(result), (method, sexp, result)
                        outcomes.append(ok)
            assert raw.connected, f"{user}'s connection was dropped"
            assert (await perspective.callRemote("whoami"))["user"] == user
            await raw.close()
            if user == "root":
                default_plugins(grid)    # whatever the administrator's fuzz registered

    assert len(outcomes) > 300 and any(outcomes) and not all(outcomes)
    assert logged.problems() == []
    texts = logged.texts()
    assert max(map(len, texts)) < 2000, max(texts, key=len)[:500]
    # The controller serves another user's session as before.
    assert bob.connected
    listed = await bob.list()
    assert sorted((r["name"], r["state"], r["lnm"]) for r in listed) == bob_before
    assert (await bob._remote("whoami"))["user"] == "bob"


def test_the_fuzz_covers_every_method_of_the_client_interface():
    methods = {name for name, _ in inspect.getmembers(UserPerspective)
               if name.startswith("perspective_")}
    assert {"perspective_" + m for m in PERSPECTIVE_METHODS} == methods

"""``list`` as the client boundary sends it (issue 16): JSON chunks made
straight from the state's records, without a copy of each. What leaves is
what the copies showed before: an ordinary user's own VMs (or, with
user_visibility "all", every VM, other users' without args), what
list_request plugins leave, figures with ``status``; and the state's records
are never changed by a listing."""

import copy

import pytest
import pytest_twisted
from twisted.internet import defer, task

from usher import states
from usher.config import load_plugin_config
from usher.controller.client_link import UserPerspective
from usher.controller.core import Controller
from usher.controller.plugins import PluginRegistry
from usher.controller.state import LNMInfo
from usher.errors import Rejected
from usher.records import decode_records
from usher.settings import default_plugin_registrations
from usher.vmset import Selection

from tests.fakes import result_of

DOMAIN = "usher.test"


def full(short, owner):
    return f"{short}.{owner}.{DOMAIN}"


def build(user_visibility="own"):
    """A controller with the default plugins, alice's and bob's VMs on two
    LNMs and a stranger (unmanaged) on lnm2."""
    controller = Controller(domain=DOMAIN, clock=task.Clock(), admins=["root"],
                            user_visibility=user_visibility)
    controller.plugins = PluginRegistry(controller.chains, controller.api,
                                        load_config=load_plugin_config)
    controller.plugins.register_configured(default_plugin_registrations())
    state = controller.state
    for lnm in ("lnm1", "lnm2"):
        state.lnms[lnm] = LNMInfo(lnm, {"hostname": lnm}, handle=object())
    for i in range(1, 41):
        owner = "alice" if i % 4 else "bob"
        cluster = "web" if i % 3 else "db"
        state.add(state.new_record(full(f"{i}.{cluster}", owner), state=states.RUN,
                                   lnm=f"lnm{1 + i % 2}", memory_mib=256, vcpus=1,
                                   uuid=f"uuid-{i}", args={"token": f"{owner}-secret-{i}"}))
    state.set_unmanaged("stranger", "lnm2", states.RUN)
    return controller




def wire_list(controller, user, admin, selection=None, status=False):
    """What a client gets from ``list`` (the PB boundary's answer, decoded)."""
    avatar = UserPerspective(controller, user, admin, None, clock=controller.clock,
                             call_timeout=10)
    return decode_records(result_of(avatar.perspective_list(selection, status)))


def dict_list(controller, user, admin, selection=None, status=False):
    return result_of(defer.ensureDeferred(controller.list(user, admin, selection, status)))


SELECTIONS = [None, {"everything": True}, [full("1.web", "alice"), full("4.web", "bob")],
              ["[1-3].web"], {"regex": r"^1\d\."}, {"clusters": ["db"]},
              {"lnms": ["lnm2"]}, {"names": ["1.web"], "lnms": ["lnm2"]},
              {"everything": True, "names": ["1.web"]}]
USERS = [("alice", False, "own"), ("bob", False, "all"), ("root", True, "own")]


@pytest.mark.parametrize("status", [False, True])
@pytest.mark.parametrize("user, admin, visibility", USERS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_the_wire_shows_what_the_copies_showed(selection, user, admin, visibility, status):
    controller = build(visibility)
    before = copy.deepcopy((controller.state.vms, controller.state.unmanaged))
    try:
        expected = dict_list(controller, user, admin, selection, status)
    except Exception as error:      # e.g. bob naming "1.web" of his own: no such VM
        with pytest.raises(type(error)):
            wire_list(controller, user, admin, selection, status)
        return
    assert wire_list(controller, user, admin, selection, status) == expected
    # Nothing listed was changed in the state (no "status" added, no args taken).
    assert (controller.state.vms, controller.state.unmanaged) == before


def test_an_ordinary_user_sees_only_their_own_with_their_args():
    controller = build()
    listed = wire_list(controller, "bob", False)
    assert {r["name"] for r in listed} == {full(f"{i}.{'web' if i % 3 else 'db'}", "bob")
                                           for i in range(4, 41, 4)}
    assert all(r["args"] == {"token": r["args"]["token"]} and "bob-secret" in
               r["args"]["token"] for r in listed)


def test_another_users_args_never_leave_but_the_state_keeps_them():
    controller = build("all")
    listed = {r["name"]: r for r in wire_list(controller, "bob", False)}
    assert "stranger" in listed and len(listed) == 41
    alices = full("1.web", "alice")
    assert "args" not in listed[alices]
    assert listed[full("4.web", "bob")]["args"] == {"token": "bob-secret-4"}
    assert controller.state.vms[alices]["args"] == {"token": "alice-secret-1"}
    # Administrators see everyone's args.
    by_root = {r["name"]: r for r in wire_list(controller, "root", True)}
    assert by_root[alices]["args"] == {"token": "alice-secret-1"}


def test_status_figures_are_there_and_never_stored_in_the_state():
    controller = build()
    name = full("1.web", "alice")
    controller.monitoring.report("lnm2", {"cpu": [1.0, 1.0, 1.0]},
                                 [{"name": name, "cpu": [12.5, 10.0, 8.0]}])
    listed = {r["name"]: r for r in wire_list(controller, "alice", False, status=True)}
    assert listed[name]["status"]["cpu"] == [12.5, 10.0, 8.0]
    assert listed[full("2.web", "alice")]["status"] == {}
    assert all("status" in r for r in listed.values())
    assert all("status" not in r for r in wire_list(controller, "alice", False))
    assert not any("status" in r for r in controller.state.vms.values())


class Hider:
    """A list_request plugin hiding the VMs of cluster db (by its records)
    and one more name, the two ways a plugin may: drop, or take the name
    off request.vms."""

    name = "hider"

    def __init__(self, also=None):
        self.also = also
        self.seen = []

    def entry_point(self, event):
        request = event.request
        self.seen.append((request.user, len(request.vms), len(request.records)))
        for name in list(request.vms):
            if request.records[name].get("cluster") == "db":
                request.drop(name, "hidden by the site")
        if self.also in request.vms:
            request.vms.remove(self.also)


@pytest.mark.parametrize("user, admin", [("alice", False), ("root", True)])
def test_a_list_request_plugin_still_hides_names(user, admin):
    controller = build()
    hider = Hider(also=full("1.web", "alice"))
    controller.chains.add(hider, "list_request")
    for selection in (None, {"regex": "alice"}, ["[1-12].web", "[3-12].db"]):
        try:
            listed = {r["name"] for r in wire_list(controller, user, admin, selection)}
        except Exception:
            continue                                # (root naming alice's short names)
        assert listed and not any(".db." in n for n in listed)
        assert full("1.web", "alice") not in listed
        assert listed == {r["name"] for r in dict_list(controller, user, admin, selection)}
    # The plugin saw every name and its record.
    assert hider.seen[0][0] == user and hider.seen[0][1] == hider.seen[0][2] > 0


def test_a_plugin_rejecting_the_list_rejects_it():
    controller = build()

    class Refuser:
        name = "refuser"

        def entry_point(self, event):
            event.request.reject("no listing today")

    controller.chains.add(Refuser(), "list_request")
    avatar = UserPerspective(controller, "alice", False, None, clock=controller.clock,
                             call_timeout=10)
    failures = []
    avatar.perspective_list(None, False).addErrback(failures.append)
    assert failures and failures[0].check(Rejected)


@pytest_twisted.ensureDeferred
async def test_a_vm_removed_while_a_plugin_waits_is_left_out():
    controller = build()
    waiting = defer.Deferred()

    class Slow:
        name = "slow"

        async def entry_point(self, event):
            await waiting

    controller.chains.add(Slow(), "list_request")
    avatar = UserPerspective(controller, "alice", False, None, clock=controller.clock,
                             call_timeout=10)
    answer = avatar.perspective_list(None, False)
    assert not answer.called
    gone = full("1.web", "alice")
    controller.state.remove(gone)
    waiting.callback(None)
    names = {r["name"] for r in decode_records(await answer)}
    assert gone not in names and full("2.web", "alice") in names


def test_the_owned_view_lists_its_records_as_they_are():
    controller = build()
    view = controller.state.owned_view("bob")
    values = view.values()
    assert isinstance(values, list) and len(values) == len(view) == 10
    assert all(a is controller.state.vms[a["name"]] for a in values)
    controller.state.remove(full("4.web", "bob"))
    assert len(view.values()) == 9
    assert Selection(everything=True).pick(view, lambda n: n)[0] == view.values()

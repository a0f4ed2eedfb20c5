"""clients/ush/progress.py: which notices of the user's own commands are
news, on a task.Clock."""

from twisted.internet import task

from usher.clients.ush.progress import REPORTED_WINDOW, OwnCommands

HOST = ("run", "vmm47")


def own_commands():
    printed = []
    clock = task.Clock()
    return OwnCommands(printed.append, out=None, clock=clock), printed, clock


def finish(own, kind, result):
    command = own.begin(kind)
    command.report(result)
    own.end(command)
    own.flush()


def notice(own, printed, name, old, new):
    text = f"{name}: {old[0]} -> {new[0]}"
    if not own.changed(name, old, new, text):
        printed.append(text)


def test_a_notice_of_the_reported_state_just_after_the_result_is_dropped_once():
    own, printed, clock = own_commands()
    finish(own, "pause", {"done": [{"name": "a", "state": "paused"}], "failed": []})
    clock.advance(REPORTED_WINDOW / 2)
    notice(own, printed, "a", HOST, ("paused", "vmm47"))
    assert printed == []
    notice(own, printed, "a", ("paused", "vmm47"), HOST)
    notice(own, printed, "a", HOST, ("paused", "vmm47"))
    assert printed == ["a: paused -> run", "a: run -> paused"]


def test_a_failed_vm_or_an_already_one_keeps_its_next_notice():
    own, printed, clock = own_commands()
    finish(own, "pause", {"done": [{"name": "b", "state": "paused", "already": True}],
                          "failed": [{"name": "a", "error": "busy", "code": "busy"}]})
    notice(own, printed, "a", HOST, ("paused", "vmm47"))
    notice(own, printed, "b", ("paused", "vmm47"), HOST)
    assert printed == ["a: run -> paused", "b: paused -> run"]


def test_a_notice_long_after_the_result_is_news_even_if_it_matches():
    own, printed, clock = own_commands()
    finish(own, "pause", {"done": [{"name": "a", "state": "paused"}], "failed": []})
    finish(own, "delete", {"done": [{"name": "d", "state": None}], "failed": []})
    clock.advance(REPORTED_WINDOW + 1)
    notice(own, printed, "a", HOST, ("paused", "vmm47"))
    assert not own.removed("d", "d: removed")
    assert printed == ["a: run -> paused"]


def test_a_started_vm_drops_one_late_notice_whatever_its_state():
    own, printed, clock = own_commands()
    finish(own, "start", {"started": [{"name": "s", "lnm": "vmm47"}], "failed": []})
    notice(own, printed, "s", ("starting", "vmm47"), HOST)
    notice(own, printed, "s", HOST, ("paused", "vmm47"))
    assert printed == ["s: run -> paused"]
    # A delete's result says removed: that notice is dropped, not a change.
    finish(own, "delete", {"done": [{"name": "d", "state": None}], "failed": []})
    assert own.removed("d", "d: removed")

"""ush's plugin commands (plugins, register_plugin, unregister_plugin) with a
real client against the controller's client boundary on an in-process grid."""

import io
import json

import pytest_twisted
from twisted.internet import reactor

from usher.clients import ush
from usher.clients.ush import help_text as ush_help

from tests.clientgrid import PASSWORDS


async def run_ush(grid, user, *words, json_output=False):
    settings = ush.UshSettings(controller_host="127.0.0.1",
                               controller_port=grid.port.getHost().port,
                               controller_tls_name="localhost", ssl_ca_file=grid.ca_file,
                               username=user, password=PASSWORDS[user], call_timeout=20)
    out, err = io.StringIO(), io.StringIO()
    shell = ush.Shell(ush.default_client_factory(reactor, settings), settings, out=out,
                      err=err, clock=reactor, json_output=json_output)
    code = await shell.run_once(list(words))
    return code, out.getvalue(), err.getvalue()


@pytest_twisted.ensureDeferred
async def test_administrators_list_register_and_unregister_plugins(tmp_path, client_grids):
    grid = await client_grids()
    code, out, err = await run_ush(grid, "root", "plugins")
    assert code == ush.EXIT_OK, err
    assert "available plugins:" in out
    assert any(line.split()[:2] == ["pack", "Pack"] for line in out.splitlines())
    assert any(line.split()[:3] == ["start_request", "10", "open_authz"]
               for line in out.splitlines())

    config = tmp_path / "pack.config"
    config.write_text("suggestion = prefer\n")
    code, out, err = await run_ush(grid, "root", "register_plugin", "-o", "40", "pack",
                                   "start_request,migrate_request", str(config))
    assert code == ush.EXIT_OK, err
    assert out.startswith("Plugin pack registered for start_request, migrate_request.\n")
    rows = [line.split()[:3] for line in out.splitlines() if line.startswith(("start_", "migr"))]
    default_limits = {"start_request": [("20", "limits")], "migrate_request": []}
    assert rows == [[event, order, plugin] for event in ("migrate_request", "start_request")
                    for order, plugin in [("10", "open_authz")] + default_limits[event]
                    + [("40", "pack"), ("50", "roundrobin")]]

    code, out, _ = await run_ush(grid, "root", "plugins", json_output=True)
    described = json.loads(out)
    assert {"plugin": "pack", "event": "start_request", "order": 40, "config": str(config),
            "timeout": 10} in described["registered"]

    code, out, _ = await run_ush(grid, "root", "unregister_plugin", "pack", "migrate_request")
    assert (code, out) == (ush.EXIT_OK, "Plugin pack unregistered from migrate_request.\n")
    code, out, _ = await run_ush(grid, "root", "unregister_plugin", "pack")
    assert (code, out) == (ush.EXIT_OK, "Plugin pack unregistered from every event.\n")
    assert "pack" not in {r.plugin.name for r in grid.controller.chains.registrations()}

    # one event of several is refused: the user is told exactly what was done
    code, out, err = await run_ush(grid, "root", "register_plugin", "spread",
                                   "start_request,start_requests")
    assert code == ush.EXIT_FAILED
    assert err == ("Error: registered spread for start_request, but not for start_requests: "
                   "unknown event 'start_requests'\n")


@pytest_twisted.ensureDeferred
async def test_ordinary_users_are_refused_and_bad_input_is_a_usage_error(client_grids):
    grid = await client_grids()
    for words in (["plugins"], ["register_plugin", "pack", "start_request"],
                  ["unregister_plugin", "roundrobin"]):
        code, out, err = await run_ush(grid, "bob", *words)
        assert (code, out, err) == (ush.EXIT_FAILED, "",
                                    "Error: only administrators may manage plugins\n"), words
    assert "roundrobin" in {r.plugin.name for r in grid.controller.chains.registrations()}

    for words, problem in (
            (["register_plugin", "pack", "start_request", "pack.config"], "absolute path"),
            (["register_plugin", "pack"], "required: events"),
            (["register_plugin", "pa-ck", "start_request"], "'pa-ck' is not a plugin name"),
            (["register_plugin", "pack", ","], "no event given"),
            (["register_plugin", "-o", "x", "pack", "start_request"], "not a whole number")):
        code, out, err = await run_ush(grid, "root", *words)
        assert code == ush.EXIT_USAGE and problem in err, (words, err)


def test_the_plugin_commands_have_help():
    for command in ("plugins", "register_plugin", "unregister_plugin"):
        text = ush_help.render(command)
        assert text.startswith(f"usage: {command}")
        assert command in ush_help.overview()

"""usherweb's REST API end to end: a sandbox (controller and LNMs as
processes over real TLS), usherweb in the test reactor over real HTTPS,
and a client that keeps cookies and the CSRF header as the browser
interface does. The stream's tests wait on the events themselves."""

import json

import pytest
import pytest_twisted

from tests.webclient import ServedWeb

DOMAIN = "usher.test"
SANDBOX_LNMS = 2
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


@pytest_twisted.async_yield_fixture(scope="module")
async def web(system, tmp_path_factory):
    served = ServedWeb(system, tmp_path_factory.mktemp("static"))
    yield served
    await served.stop()


async def alice(web, system):
    client = web.client()
    response = await client.login("alice", system.description["password"])
    assert response.code == 200, response.raw
    return client


async def bob(web):
    client = web.client()
    response = await client.login("bob", "bob-secret")
    assert response.code == 200, response.raw
    return client


async def start(client, **body):
    response = await client.post("/api/v1/vms/start", body)
    assert response.code == 200, response.raw
    return response.json


async def destroy_all(client):
    listing = (await client.get("/api/v1/vms?limit=5000")).json["vms"]
    if listing:
        await client.post("/api/v1/vms/delete", {"force": True,
                                                 "names": [r["name"] for r in listing]})


# --- Sessions -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_login_wrong_password_session_and_logout(web, system):
    client = web.client()
    open_sessions = len(web.sessions)
    wrong = await client.login("alice", "not-her-password")
    assert wrong.code == 401 and wrong.error_code == "authentication_failed"
    assert "wrong user name or password" in wrong.json["error"]["message"]
    assert len(web.sessions) == open_sessions and not client.cookies
    assert (await client.get("/api/v1/session")).error_code == "not_logged_in"

    response = await client.login("alice", system.description["password"])
    assert response.code == 200
    assert response.json["user"] == "alice" and response.json["admin"] is True
    assert response.json["domain"] == DOMAIN and len(response.json["csrf"]) >= 43
    cookie = response.header(b"set-cookie")
    assert cookie.startswith("usher_session=")
    for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
        assert flag in cookie
    assert len(client.cookies["usher_session"]) >= 43
    session = await client.get("/api/v1/session")
    assert session.code == 200 and session.json == response.json
    assert session.header(b"cache-control") == "no-store"
    assert session.header(b"content-type").startswith("application/json")
    assert "frame-ancestors 'none'" in session.header(b"content-security-policy")
    assert session.header(b"x-content-type-options") == "nosniff"
    assert session.header(b"referrer-policy") == "no-referrer"

    old_cookie = client.cookies["usher_session"]
    logout = await client.post("/api/v1/logout")
    assert logout.code == 204
    assert not client.cookies
    client.cookies["usher_session"] = old_cookie      # replayed after logout
    assert (await client.get("/api/v1/session")).error_code == "not_logged_in"
    assert len(web.sessions) == open_sessions


@pytest_twisted.ensureDeferred
async def test_session_fixation_attempt(web, system):
    attacker = web.client()
    await attacker.login("bob", "bob-secret")
    planted = attacker.cookies["usher_session"]
    # The victim's browser carries an id the attacker planted (a session of
    # the attacker's, or one made up): logging in never keeps it.
    for fixed in (planted, "A" * 43):
        victim = web.client()
        victim.cookies["usher_session"] = fixed
        response = await victim.login("alice", system.description["password"])
        assert response.code == 200
        assert victim.cookies["usher_session"] != fixed
        assert response.json["user"] == "alice"
    # The planted session was ended by the login that replaced it.
    assert (await attacker.get("/api/v1/session")).error_code == "not_logged_in"


@pytest_twisted.ensureDeferred
async def test_csrf_missing_or_wrong_is_refused_and_changes_nothing(web, system):
    client = await alice(web, system)
    before = (await client.get("/api/v1/vms")).json["total"]
    missing = await client.post("/api/v1/vms/start", {"cluster": "csrf", "count": 1},
                                csrf=False)
    assert missing.code == 403 and missing.error_code == "csrf_failed"
    wrong = await client.post("/api/v1/vms/start", {"cluster": "csrf", "count": 1},
                              headers={"X-CSRF-Token": "x" * 43}, csrf=False)
    assert wrong.code == 403 and wrong.error_code == "csrf_failed"
    other = await bob(web)                  # another session's token
    stolen = await client.post("/api/v1/vms/start", {"cluster": "csrf", "count": 1},
                               headers={"X-CSRF-Token": other.csrf}, csrf=False)
    assert stolen.code == 403
    assert (await client.post("/api/v1/logout", csrf=False)).code == 403
    assert (await client.get("/api/v1/vms")).json["total"] == before
    assert (await client.get("/api/v1/session")).code == 200


@pytest_twisted.ensureDeferred
async def test_bearer_token_for_scripts(web, system):
    browser = await alice(web, system)
    made = await browser.post("/api/v1/tokens")
    assert made.code == 201 and set(made.json) >= {"token", "expires"}
    script = web.client()
    script.token = made.json["token"]
    assert (await script.get("/api/v1/session")).json["user"] == "alice"
    # No CSRF header needed with a bearer token.
    listing = await script.get("/api/v1/vms")
    assert listing.code == 200
    assert (await script.post("/api/v1/vms/pause", {"names": ["nosuch"]})).code == 404
    # A token is not a cookie, and a cookie is not a token.
    cookie_only = web.client()
    cookie_only.cookies["usher_session"] = made.json["token"]
    assert (await cookie_only.get("/api/v1/session")).code == 401
    as_token = web.client()
    as_token.token = browser.cookies["usher_session"]
    assert (await as_token.get("/api/v1/session")).code == 401
    # The browser logging out leaves the token working; deleting it ends it.
    assert (await browser.post("/api/v1/logout")).code == 204
    assert (await script.get("/api/v1/session")).code == 200
    assert (await script.request("DELETE", "/api/v1/tokens/current")).code == 204
    gone = await script.get("/api/v1/session")
    assert gone.code == 401 and gone.error_code == "not_logged_in"


# --- VMs ------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_start_list_filters_operations_and_migrate(web, system):
    client = await alice(web, system)
    result = await start(client, cluster="webt", count=3, memory_mib=256)
    assert len(result["started"]) == 3 and not result["failed"]
    assert result["summary"].startswith("Controller started 3 VMs")
    await start(client, names=["solo"], args={"note": "one"})
    listing = (await client.get("/api/v1/vms?cluster=webt")).json
    assert listing["total"] == 3
    assert [r["name"] for r in listing["vms"]] == sorted(r["name"] for r in listing["vms"])
    assert all(r["memory_mib"] == 256 and r["state"] == "run" for r in listing["vms"])
    everything = (await client.get("/api/v1/vms")).json
    assert everything["total"] >= 4
    by_regex = (await client.get("/api/v1/vms?regex=^solo%5C.")).json
    assert [r["name"] for r in by_regex["vms"]] == [full("solo")]
    assert by_regex["vms"][0]["args"]["note"] == "one"
    lnm = listing["vms"][0]["lnm"]
    on_host = (await client.get(f"/api/v1/vms?cluster=webt&lnm={lnm}")).json
    assert on_host["total"] >= 1 and all(r["lnm"] == lnm for r in on_host["vms"])
    names = ",".join(r["name"].split(".")[0] + ".webt" for r in listing["vms"][:2])
    assert (await client.get(f"/api/v1/vms?names={names}")).json["total"] == 2
    page = (await client.get("/api/v1/vms?cluster=webt&offset=1&limit=1")).json
    assert page["total"] == 3 and page["vms"] == [listing["vms"][1]]

    paused = await client.post("/api/v1/vms/pause", {"cluster": "webt"})
    assert paused.code == 200 and len(paused.json["done"]) == 3
    assert paused.json["summary"].startswith("Controller paused 3 VMs")
    assert (await client.get("/api/v1/vms?cluster=webt&state=paused")).json["total"] == 3
    assert (await client.get("/api/v1/vms?state=paused&regex=solo")).json["total"] == 0
    # Idempotent (issue 17): paused already is done, flagged, in ush's words.
    again = await client.post("/api/v1/vms/pause", {"cluster": "webt"})
    assert again.code == 200 and all(d["already"] for d in again.json["done"])
    assert f"{listing['vms'][0]['name']} already paused" in again.json["summary"]
    nothing = await client.post("/api/v1/vms/pause", {"cluster": "nosuch"})
    assert (nothing.code, nothing.error_code) == (404, "no_such_vm")
    resumed = await client.post("/api/v1/vms/resume", {"regex": r"\.webt\."})
    assert len(resumed.json["done"]) == 3
    # Selecting by host: only webt's VMs on that LNM, or (alone) all of them there.
    there = {r["name"] for r in on_host["vms"]}
    paused = await client.post("/api/v1/vms/pause", {"cluster": "webt", "lnm": lnm})
    assert {d["name"] for d in paused.json["done"]} == there
    assert (await client.get("/api/v1/vms?cluster=webt&state=paused")).json["total"] == len(there)
    resumed = await client.post("/api/v1/vms/resume", {"lnm": [lnm]})
    assert there <= {d["name"] for d in resumed.json["done"]}
    assert all(r["lnm"] == lnm for r in (await client.get(
        f"/api/v1/vms?lnm={lnm}")).json["vms"])
    unknown_host = await client.post("/api/v1/vms/pause", {"lnm": "nosuch"})
    assert unknown_host.code == 404 and "no such LNM: nosuch" in unknown_host.raw.decode()
    assert unknown_host.error_code == "no_such_lnm"

    one = await client.get(f"/api/v1/vms/{full('solo')}")
    assert one.code == 200 and one.json["name"] == full("solo") and "status" in one.json
    short = await client.get("/api/v1/vms/solo")
    assert short.code == 200 and short.json["name"] == full("solo")

    source = (await client.get(f"/api/v1/vms/{full('solo')}")).json["lnm"]
    target = "lnm2" if source == "lnm1" else "lnm1"
    moved = await client.post("/api/v1/vms/migrate", {"names": ["solo"], "lnms": [target]})
    assert moved.code == 200, moved.raw
    assert (await client.get("/api/v1/vms/solo")).json["lnm"] == target

    for operation in ("shutdown", "destroy"):
        response = await client.post(f"/api/v1/vms/{operation}", {"names": ["solo"]})
        assert response.code == 200, response.raw
    assert (await client.get("/api/v1/vms/solo")).json["state"] == "shutoff"   # kept
    bad = await client.post("/api/v1/vms/delete", {"names": ["solo"], "force": "yes"})
    assert bad.code == 400 and "force" in bad.json["error"]["message"], bad.raw
    await client.post("/api/v1/vms/delete", {"force": True, "cluster": "webt"})
    assert (await client.get("/api/v1/vms?cluster=webt")).json["total"] == 0


@pytest_twisted.ensureDeferred
async def test_errors_have_stable_codes_and_ush_messages(web, system):
    client = await alice(web, system)
    unknown = await client.post("/api/v1/vms/pause", {"names": ["nosuch"]})
    assert unknown.code == 404 and unknown.error_code == "no_such_vm"
    completed = await system.ush("pause", "nosuch")
    assert json.loads(completed.stdout)["error"] == unknown.json["error"]["message"]
    missing = await client.get("/api/v1/vms/nosuch")
    assert missing.code == 404 and missing.error_code == "no_such_vm"
    bad_regex = await client.get("/api/v1/vms?regex=(")
    assert bad_regex.code == 400 and bad_regex.error_code == "invalid_request"
    bad_state = await client.get("/api/v1/vms?state=sleeping")
    assert bad_state.code == 400
    assert (await client.get("/api/v1/vms?limit=5001")).code == 400
    assert (await client.get("/api/v1/vms?colour=red")).code == 400
    assert (await client.get("/api/v1/nothing")).error_code == "not_found"
    wrong_method = await client.request("DELETE", "/api/v1/vms")
    assert wrong_method.code == 405 and wrong_method.header(b"allow") == "GET"
    assert (await client.get("/api/v1/lnms/nosuch")).error_code == "no_such_lnm"


@pytest_twisted.ensureDeferred
async def test_another_users_vms_never_visible(web, system):
    alice_client = await alice(web, system)
    bob_client = await bob(web)
    await start(bob_client, cluster="bobs", count=2)
    await start(alice_client, cluster="alices", count=1)
    reader = await bob_client.stream()
    snapshot = await reader.snapshot()
    assert snapshot and all(r["owner"] == "bob" for r in snapshot)
    for client, owner in ((alice_client, "alice"), (bob_client, "bob")):
        records = (await client.get("/api/v1/vms?limit=5000")).json["vms"]
        assert records and all(r["owner"] == owner for r in records)
    # alice is an administrator, bob is not: bob cannot name alice's VMs.
    alices = (await alice_client.get("/api/v1/vms?cluster=alices")).json["vms"][0]["name"]
    assert (await bob_client.get(f"/api/v1/vms/{alices}")).code == 404
    refused = await bob_client.post("/api/v1/vms/delete", {"force": True, "names": [alices]})
    assert refused.code in (403, 404)
    assert (await bob_client.get(f"/api/v1/vms?names={alices}")).json["total"] == 0
    assert (await alice_client.get("/api/v1/vms?cluster=alices")).json["total"] == 1
    # The stream of bob never carried alice's start.
    assert all(r["owner"] == "bob" for name, data in reader.events
               for r in data.get("vms", []) + data.get("changed", []))
    reader.close()
    await bob_client.post("/api/v1/vms/delete", {"force": True, "cluster": "bobs"})
    await alice_client.post("/api/v1/vms/delete", {"force": True, "cluster": "alices"})


@pytest_twisted.ensureDeferred
async def test_plugins_admins_only_lnms_top_problems(web, system):
    admin = await alice(web, system)
    plugins = await admin.get("/api/v1/plugins")
    assert plugins.code == 200 and "open_authz" in plugins.json["available"]
    user = await bob(web)
    refused = await user.get("/api/v1/plugins")
    assert refused.code == 403 and refused.error_code == "permission_denied"
    register = await user.post("/api/v1/plugins/register",
                               {"name": "open_authz", "event": "start_request"})
    assert register.code == 403
    lnms = await admin.get("/api/v1/lnms?status=1")
    assert lnms.code == 200 and {l["name"] for l in lnms.json["lnms"]} == {"lnm1", "lnm2"}
    one = await admin.get("/api/v1/lnms/lnm1")
    assert one.code == 200 and one.json["name"] == "lnm1" and "status" in one.json
    top = await admin.get("/api/v1/top?count=5")
    assert top.code == 200 and set(top.json) == {"lnms", "vms"}
    problems = await user.get("/api/v1/problems")
    assert problems.code == 200 and set(problems.json) == {"lost", "missing", "unmanaged"}


@pytest_twisted.ensureDeferred
async def test_script_arg_is_returned_json_escaped(web, system):
    client = await alice(web, system)
    hostile = "<script>alert(1)</script>&"
    await start(client, names=["xss"], args={"note": hostile})
    response = await client.get("/api/v1/vms?names=xss")
    assert response.header(b"content-type") == "application/json; charset=utf-8"
    assert b"<script>" not in response.raw and b"\\u003cscript\\u003e" in response.raw
    assert response.json["vms"][0]["args"]["note"] == hostile
    assert response.header(b"x-content-type-options") == "nosniff"
    await client.post("/api/v1/vms/delete", {"force": True, "names": ["xss"]})


@pytest_twisted.ensureDeferred
async def test_hostile_bodies_are_refused_and_change_nothing(web, system):
    client = await alice(web, system)
    before = (await client.get("/api/v1/vms")).json["total"]
    huge = await client.post("/api/v1/vms/start", raw=b"{" + b" " * (200 * 1024) + b"}")
    assert huge.code == 413 and huge.error_code == "too_large"
    not_json = await client.post("/api/v1/vms/start", raw=b"cluster=x&count=1",
                                 content_type="application/x-www-form-urlencoded")
    assert not_json.code == 415 and not_json.error_code == "unsupported_media_type"
    broken = await client.post("/api/v1/vms/start", raw=b'{"cluster": "x", "count": ')
    assert broken.code == 400 and broken.error_code == "invalid_request"
    for body in ([1, 2], "x", {"cluster": "x", "count": "3"}, {"cluster": 7, "count": 1},
                 {"cluster": "x", "count": True}, {"cluster": "x", "count": 1, "extra": 1},
                 {"names": "solo"}, {"names": [1]}, {"cluster": "x", "count": 1,
                                                     "args": {"bad key": 1}},
                 {"cluster": "x", "count": 1, "args": {"a": {"nested": 1}}},
                 {"cluster": "x" * 5000, "count": 1}, {"cluster": "x", "count": -1}):
        response = await client.post("/api/v1/vms/start", body)
        assert response.code == 400, (body, response.raw)
        assert response.error_code == "invalid_request"
    assert (await client.post("/api/v1/vms/pause", {})).code == 400
    assert (await client.post("/api/v1/vms/pause", {"regex": "(?=x)"})).code == 400
    assert (await client.post("/api/v1/login", {"username": ["alice"],
                                                "password": "x"})).code == 400
    assert (await client.get("/api/v1/vms")).json["total"] == before


# --- The stream -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_stream_delivers_a_change_made_by_ush(web, system):
    client = await alice(web, system)
    await start(client, cluster="live", count=2)
    reader = await client.stream()
    assert reader.response.headers.getRawHeaders(b"content-type")[0].startswith(
        b"text/event-stream")
    snapshot = await reader.snapshot()
    assert reader.names[0] == "snapshot"
    assert {r["name"] for r in snapshot} >= {full("1.live"), full("2.live")}
    # A change made by another client (ush, another process) reaches the stream.
    completed = await system.ush("pause", "1.live")
    assert completed.returncode == 0, completed.stderr
    name, data = await reader.wait(lambda name, data: name == "changes" and any(
        r["name"] == full("1.live") and r["state"] == "paused" for r in data["changed"]))
    assert data["removed"] == []
    await system.ush("delete", "--force", "-n", "live")
    await reader.wait(lambda name, data: name == "changes" and full("2.live") in (
        data["removed"] + [r["name"] for r in data["changed"] if r["state"] == "shutoff"]))
    # Logging out ends the stream.
    await client.post("/api/v1/logout")
    await reader.wait(lambda name, data: name == "session-ended")
    await reader.ended

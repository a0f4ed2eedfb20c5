"""usherweb without a controller: sessions, expiry, tokens and CSRF on a
task.Clock with a scripted client; the event stream's coalescing,
keepalives and its bound on a browser that does not read; the daemon's
refusal to serve plain HTTP unless told; the [web] settings."""

import json

import pytest
import pytest_twisted
from twisted.internet import defer, task

from usher.clients.web import (COOKIE, TOKEN, EventStream, WebSessions, WebSettings,
                               check_transport, encode_json)
from usher.clients.web.errors import STATUSES, code_of, from_usher_error
from usher.errors import (AuthenticationFailed, ConfigError, InvalidRequest, LinkFailure,
                          NoSuchVM, Rejected, Unavailable)


class ScriptedClient:
    """An UsherClient-like object: connect() answers as told."""

    def __init__(self, user, password, source, *, accept="secret", admin=False):
        self.user, self.password, self.source = user, password, source
        self.accept = accept
        self.admin = admin
        self.connected = False
        self.disconnects = 0
        self.vms = {}
        self.seq = 0
        self._changes, self._connections = [], []

    def connect(self):
        if self.password != self.accept:
            return defer.fail(AuthenticationFailed("wrong user name or password"))
        self.connected = True
        return defer.succeed({"user": self.user, "admin": self.admin, "domain": "t.test"})

    def disconnect(self):
        self.connected = False
        self.disconnects += 1
        return defer.succeed(None)

    def on_change(self, callback):
        self._changes.append(callback)
        return lambda: self._changes.remove(callback)

    def on_connection(self, callback):
        self._connections.append(callback)
        return lambda: self._connections.remove(callback)

    def change(self, changed, removed=()):
        for record in changed:
            self.vms[record["name"]] = record
        for name in removed:
            self.vms.pop(name, None)
        self.seq += 1
        for callback in list(self._changes):
            callback(changed, list(removed))


def make_sessions(**changes):
    clock = task.Clock()
    made = []

    def factory(user, password, source):
        made.append(ScriptedClient(user, password, source))
        return made[-1]
    settings = WebSettings(**{"session_idle_timeout": 100, "session_max_age": 1000,
                              "max_sessions": 3, **changes})
    return WebSessions(settings, clock, factory), clock, made


def login(sessions, user="alice", password="secret", **kw):
    return defer.ensureDeferred(sessions.login(user, password, **kw))


@pytest_twisted.ensureDeferred
async def test_login_makes_a_new_random_session_and_passes_the_source():
    sessions, clock, made = make_sessions()
    first = await login(sessions, source="192.0.2.7")
    second = await login(sessions)
    assert first.id != second.id and first.csrf != second.csrf
    assert len(first.id) >= 43 and len(first.csrf) >= 43 and first.id != first.csrf
    assert made[0].source == "192.0.2.7" and first.kind == COOKIE
    assert sessions.find(first.id, COOKIE) is first
    assert sessions.find(first.id, TOKEN) is None
    assert sessions.find("made-up", COOKIE) is None
    assert first.describe() == {"user": "alice", "admin": False, "domain": "t.test",
                                "csrf": first.csrf}


@pytest_twisted.ensureDeferred
async def test_wrong_password_opens_nothing():
    sessions, clock, made = make_sessions()
    with pytest.raises(AuthenticationFailed):
        await login(sessions, password="wrong")
    assert len(sessions) == 0
    for user, password in ((["a"], "x"), ("", "x"), ("a", None), ("a" * 5000, "x")):
        with pytest.raises(InvalidRequest):
            await login(sessions, user=user, password=password)


@pytest_twisted.ensureDeferred
async def test_login_ends_the_session_the_browser_carried():
    sessions, clock, made = make_sessions()
    planted = await login(sessions)
    fresh = await login(sessions, replacing=planted)
    assert planted.closed and planted.why_closed == "replaced by a new login"
    assert sessions.find(planted.id, COOKIE) is None
    assert sessions.find(fresh.id, COOKIE) is fresh and fresh.id != planted.id
    assert made[0].disconnects == 1


@pytest_twisted.ensureDeferred
async def test_idle_expiry_and_use_keeps_it_alive():
    sessions, clock, made = make_sessions()
    session = await login(sessions)
    ended = []
    session.on_close.append(ended.append)
    clock.advance(60)
    sessions.touch(session)
    clock.advance(60)            # 120 s after login, 60 s after its last use
    assert not session.closed
    clock.advance(40)
    assert session.closed and ended == ["expired (idle)"]
    assert sessions.find(session.id, COOKIE) is None
    assert made[0].disconnects == 1


@pytest_twisted.ensureDeferred
async def test_absolute_expiry_whatever_the_use():
    sessions, clock, made = make_sessions()
    session = await login(sessions)
    for _ in range(19):
        clock.advance(50)
        sessions.touch(session)
    assert not session.closed
    clock.advance(50)            # 1000 s after login
    assert session.closed and session.why_closed == "expired (session_max_age)"


@pytest_twisted.ensureDeferred
async def test_find_refuses_an_expired_session_before_its_timer():
    sessions, clock, made = make_sessions()
    session = await login(sessions)
    clock.rightNow += 101         # time moved without the timer running yet
    assert sessions.find(session.id, COOKIE) is None and session.closed


@pytest_twisted.ensureDeferred
async def test_max_sessions():
    sessions, clock, made = make_sessions()
    for _ in range(3):
        await login(sessions)
    with pytest.raises(Unavailable, match="too many open sessions"):
        await login(sessions)
    assert len(made) == 3        # refused before contacting the controller


@pytest_twisted.ensureDeferred
async def test_token_shares_the_connection_until_both_end():
    sessions, clock, made = make_sessions()
    session = await login(sessions)
    token = sessions.make_token(session)
    assert token.kind == TOKEN and token.id not in (session.id, session.csrf)
    assert token.client is session.client and len(made) == 1
    assert sessions.find(token.id, TOKEN) is token
    assert sessions.find(token.id, COOKIE) is None
    await sessions.close(session)
    assert made[0].disconnects == 0          # the token still uses it
    clock.advance(100)                        # the token's idle timeout
    assert token.closed and made[0].disconnects == 1
    with pytest.raises(AuthenticationFailed):
        sessions.make_token(session)


@pytest_twisted.ensureDeferred
async def test_one_login_holds_a_bounded_number_of_tokens():
    from usher.clients.web.sessions import MAX_TOKENS_PER_LOGIN
    sessions, clock, made = make_sessions(max_sessions=1000)
    session = await login(sessions)
    for _ in range(MAX_TOKENS_PER_LOGIN):
        sessions.make_token(session)
    with pytest.raises(Unavailable, match="already has"):
        sessions.make_token(session)


@pytest_twisted.ensureDeferred
async def test_csrf_check():
    sessions, clock, made = make_sessions()
    session = await login(sessions)
    assert session.check_csrf(session.csrf)
    for wrong in (None, "", session.csrf[:-1], session.csrf + "x", session.id, "é" * 43):
        assert not session.check_csrf(wrong)


@pytest_twisted.ensureDeferred
async def test_a_session_shown_in_a_log_shows_no_credential():
    sessions, clock, made = make_sessions()
    session = await login(sessions)
    shown = repr(session)
    assert session.user in shown
    assert session.id not in shown and session.csrf not in shown


@pytest_twisted.ensureDeferred
async def test_stop_closes_every_session():
    sessions, clock, made = make_sessions()
    await login(sessions)
    await login(sessions)
    await sessions.stop()
    assert len(sessions) == 0 and all(c.disconnects == 1 for c in made)
    with pytest.raises(Unavailable):
        await login(sessions)


# --- Errors and encoding ------------------------------------------------------------------

def test_error_codes_and_ush_messages():
    assert code_of(NoSuchVM("no such VM: x")) == "no_such_vm"
    assert code_of(Rejected("quota")) == "rejected"
    assert code_of(LinkFailure("lost", sent=True)) == "outcome_unknown"
    assert code_of(LinkFailure("lost", sent=False)) == "unavailable"
    assert code_of(Unavailable("down")) == "unavailable"
    error = from_usher_error(NoSuchVM("no such VM: x.alice.t"))
    assert (error.status, error.message) == (404, "no such VM: x.alice.t")
    assert STATUSES["csrf_failed"] == 403 and STATUSES["too_large"] == 413


def test_json_escapes_markup():
    encoded = encode_json({"a": "<script>&</script>"})
    assert b"<" not in encoded and b">" not in encoded and b"&" not in encoded
    assert json.loads(encoded) == {"a": "<script>&</script>"}


# --- The event stream ----------------------------------------------------------------------

class FakeRequest:
    def __init__(self):
        self.written = []
        self.headers = {}
        self.code = None
        self.finished = False
        self.producer = None
        self.finish_d = defer.Deferred()
        self.aborted = False
        self.channel = self
        self.transport = self

    def setResponseCode(self, code):
        self.code = code

    def setHeader(self, name, value):
        self.headers[name] = value

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def notifyFinish(self):
        return self.finish_d

    def write(self, data):
        self.written.append(data)

    def finish(self):
        self.finished = True

    def abortConnection(self):
        self.aborted = True

    def events(self):
        out = []
        for chunk in self.written:
            for block in chunk.decode().split("\n\n"):
                if block.startswith("event: "):
                    name, data = block.split("\n", 1)
                    out.append((name[7:], json.loads(data[6:])))
                elif block.startswith(":"):
                    out.append(("comment", block[1:].strip()))
        return out


async def open_stream(vms=0, **changes):
    sessions, clock, made = make_sessions(**changes)
    session = await login(sessions)
    client = made[0]
    client.vms = {f"{i}.c.alice.t": {"name": f"{i}.c.alice.t", "state": "run"}
                  for i in range(vms)}
    request = FakeRequest()
    stream = EventStream(request, session, sessions.settings, clock)
    stream.open()
    return sessions, clock, client, request, stream


@pytest_twisted.ensureDeferred
async def test_snapshot_comes_in_parts_of_at_most_1000():
    sessions, clock, client, request, stream = await open_stream(vms=2500)
    events = request.events()
    assert [name for name, _ in events] == ["snapshot", "snapshot-part", "snapshot-part",
                                            "snapshot-end"]
    assert [len(data.get("vms", [])) for _, data in events] == [1000, 1000, 500, 0]
    assert events[0][1]["total"] == 2500 and events[0][1]["parts"] == 3
    names = [r["name"] for _, data in events for r in data.get("vms", [])]
    assert len(set(names)) == 2500
    assert request.headers[b"content-type"].startswith(b"text/event-stream")


@pytest_twisted.ensureDeferred
async def test_changes_are_coalesced_and_keepalives_sent():
    sessions, clock, client, request, stream = await open_stream(vms=2)
    del request.written[:]
    client.change([{"name": "0.c.alice.t", "state": "paused"}])
    clock.advance(0)                           # the first change goes at once
    client.change([{"name": "0.c.alice.t", "state": "run"}])
    client.change([{"name": "1.c.alice.t", "state": "paused"}])
    client.change([], removed=["1.c.alice.t"])
    client.change([{"name": "2.c.alice.t", "state": "starting"}])
    assert len(request.events()) == 1
    clock.advance(0.1)                         # then at most one per 100 ms
    events = request.events()
    assert events == [
        ("changes", {"changed": [{"name": "0.c.alice.t", "state": "paused"}], "removed": []}),
        ("changes", {"changed": [{"name": "0.c.alice.t", "state": "run"},
                                 {"name": "2.c.alice.t", "state": "starting"}],
                     "removed": ["1.c.alice.t"]})]
    del request.written[:]
    clock.advance(15)
    assert request.events() == [("comment", "keepalive")]


@pytest_twisted.ensureDeferred
async def test_stream_ends_with_the_session_and_unsubscribes():
    sessions, clock, client, request, stream = await open_stream(vms=1)
    await sessions.close(stream.session, "logged out")
    assert request.events()[-1] == ("session-ended", {"reason": "logged out"})
    assert request.finished and stream.closed
    assert client._changes == [] and client._connections == []


@pytest_twisted.ensureDeferred
async def test_a_browser_that_does_not_read_is_cut_off():
    sessions, clock, client, request, stream = await open_stream(
        vms=1, stream_buffer_bytes=65536)
    stream.pauseProducing()                    # the connection's buffer is full
    written = len(request.written)
    big = "x" * 1000
    for i in range(100):
        client.change([{"name": f"{i}.c.alice.t", "state": "run", "note": big}])
        clock.advance(0.1)
        if stream.closed:
            break
    assert stream.closed and request.aborted
    assert len(request.written) == written     # nothing more was sent, nor kept
    assert client._changes == []


@pytest_twisted.ensureDeferred
async def test_a_paused_browser_gets_what_was_held_once_it_reads():
    sessions, clock, client, request, stream = await open_stream(vms=1)
    stream.pauseProducing()
    client.change([{"name": "0.c.alice.t", "state": "paused"}])
    clock.advance(0.1)
    before = len(request.written)
    stream.resumeProducing()
    assert len(request.written) == before + 1
    assert request.events()[-1][1]["changed"][0]["state"] == "paused"


@pytest_twisted.ensureDeferred
async def test_a_closed_connection_unsubscribes():
    sessions, clock, client, request, stream = await open_stream(vms=1)
    request.finish_d.errback(ConnectionError("gone"))
    assert stream.closed and client._changes == [] and not stream.session.streams
    client.change([{"name": "0.c.alice.t", "state": "paused"}])


# --- Settings and transport -----------------------------------------------------------------

def test_plain_http_is_refused_unless_allowed(tmp_path):
    with pytest.raises(ConfigError, match="serves HTTPS only"):
        check_transport(WebSettings())
    with pytest.raises(ConfigError, match="set both"):
        check_transport(WebSettings(ssl_cert_file="/x"))
    check_transport(WebSettings(allow_plain_http=True))
    with pytest.raises(ConfigError, match="static_dir"):
        check_transport(WebSettings(allow_plain_http=True, static_dir=str(tmp_path / "no")))


def test_web_settings_defaults_from_the_spec(tmp_path):
    import dataclasses

    from usher import settings
    from usher.config import load_config
    spec = dataclasses.replace(settings.WEB, host_file=str(tmp_path / "none"))
    loaded = WebSettings.from_config(load_config(spec, env={}, home=str(tmp_path)))
    assert loaded == WebSettings()
    assert loaded.port == 7394 and loaded.session_idle_timeout == 1800
    assert loaded.max_request_bytes == 65536 and not loaded.allow_plain_http

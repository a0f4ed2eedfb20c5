"""GET /api/v1/stream: Server-Sent Events fed by the session's
``UsherClient`` (its ``on_change`` and ``on_connection`` callbacks, which
the controller's pushes drive: no polling).

Events (WEB_SPEC)::

    event: snapshot        data: {"vms": [first part], "seq", "total", "parts"}
    event: snapshot-part   data: {"vms": [next part]}        (parts of <= 1,000)
    event: snapshot-end    data: {"seq", "total"}
    event: changes         data: {"changed": [records], "removed": [names]}
    event: connection      data: {"state", "detail"}
    event: session-ended   data: {"reason"}               (then the stream closes)
    : keepalive                                           (a comment, every 15 s)

Changes are coalesced: at most one ``changes`` event per ``stream_coalesce``
seconds, holding each VM's latest record once. A browser that does not
read (its connection's buffer full, so the producer is paused) has its
events held here up to ``stream_buffer_bytes``; past that its stream is
cut off (it reconnects and gets a fresh snapshot), so a slow browser costs
bounded memory.
"""

import json

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from usher.clients.ush.format import by_name

log = Logger()

SNAPSHOT_PART = 1000


def frame(event, data):
    """One SSE event; JSON never holds a raw newline, so one data line."""
    text = json.dumps(data, separators=(",", ":"), default=str)
    return f"event: {event}\ndata: {text}\n\n".encode("utf-8")


KEEPALIVE = b": keepalive\n\n"


@implementer(IPushProducer)
class EventStream:
    """One open stream of one session, writing to ``request``."""

    def __init__(self, request, session, settings, clock):
        self.request = request
        self.session = session
        self.settings = settings
        self.clock = clock
        self.closed = False
        self.paused = False
        self._held = []             # frames written while paused
        self._held_bytes = 0
        self._changed = {}          # name -> latest record, not yet sent
        self._removed = set()
        self._flush_call = None
        self._last_flush = None
        self._keepalive = None
        self._unsubscribe = []
        self.events_sent = 0

    # -- lifetime -----------------------------------------------------------

    def open(self):
        """Headers, the snapshot, then follow the client's changes."""
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")    # no proxy buffering
        request.registerProducer(self, True)
        client = self.session.client
        self._unsubscribe = [client.on_change(self._on_change),
                             client.on_connection(self._on_connection)]
        self.session.streams.add(self)
        self.session.on_close.append(self._session_ended)
        request.notifyFinish().addBoth(self._gone)
        self._send_snapshot(list(client.vms.values()), getattr(client, "seq", 0))
        if not client.connected:
            self._write(frame("connection", {"state": "reconnecting",
                                             "detail": "not connected to the controller"}))
        self._keepalive = self.clock.callLater(self.settings.stream_keepalive, self._ping)

    def _send_snapshot(self, records, seq):
        records = [r for r in by_name(records) if "state" in r]
        parts = [records[i:i + SNAPSHOT_PART] for i in range(0, len(records), SNAPSHOT_PART)]
        parts = parts or [[]]
        # Straight to the connection, even once it says it is full: the
        # snapshot is bounded by the user's VMs, as a GET /vms answer is;
        # stream_buffer_bytes bounds what follows.
        write = self.request.write
        write(frame("snapshot", {"vms": parts[0], "seq": seq, "total": len(records),
                                 "parts": len(parts)}))
        for part in parts[1:]:
            write(frame("snapshot-part", {"vms": part}))
        write(frame("snapshot-end", {"seq": seq, "total": len(records)}))
        self.events_sent += len(parts) + 1

    def _session_ended(self, why):
        if self.closed:
            return
        self._flush()
        self._write(frame("session-ended", {"reason": why}))
        self.close()

    def close(self):
        """Finish the response (the browser sees the stream end)."""
        if self.closed:
            return
        self._cleanup()
        try:
            self.request.unregisterProducer()
            self.request.finish()
        except Exception:
            pass

    def cut_off(self, why):
        """Drop a browser that cannot keep up: abort its connection."""
        if self.closed:
            return
        log.warn("usherweb: stream of {user} cut off: {why}", user=self.session.user, why=why)
        self._cleanup()
        try:
            self.request.unregisterProducer()
        except Exception:
            pass
        transport = self.request.channel and self.request.channel.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()

    def _gone(self, _result):
        self._cleanup()

    def _cleanup(self):
        if self.closed:
            return
        self.closed = True
        for unsubscribe in self._unsubscribe:
            try:
                unsubscribe()
            except ValueError:
                pass
        self._unsubscribe = []
        for call in (self._flush_call, self._keepalive):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._keepalive = None
        self._held, self._held_bytes = [], 0
        self._changed.clear()
        self._removed.clear()
        self.session.streams.discard(self)
        if self._session_ended in self.session.on_close:
            self.session.on_close.remove(self._session_ended)

    # -- the client's callbacks -----------------------------------------------

    def _on_change(self, changed, removed):
        if self.closed:
            return
        for record in changed:
            name = record["name"]
            self._removed.discard(name)
            self._changed[name] = record
        for name in removed:
            self._changed.pop(name, None)
            self._removed.add(name)
        self._schedule()

    def _on_connection(self, state, detail):
        if self.closed:
            return
        self._flush()
        self._write(frame("connection", {"state": state, "detail": detail}))

    def _schedule(self):
        if self._flush_call is not None:
            return
        now = self.clock.seconds()
        interval = self.settings.stream_coalesce
        delay = 0.0 if self._last_flush is None else max(
            0.0, self._last_flush + interval - now)
        self._flush_call = self.clock.callLater(delay, self._timed_flush)

    def _timed_flush(self):
        self._flush_call = None
        self._flush()

    def _flush(self):
        if self.closed or not (self._changed or self._removed):
            return
        changed = by_name(list(self._changed.values()))
        removed = sorted(self._removed)
        self._changed, self._removed = {}, set()
        self._last_flush = self.clock.seconds()
        self._write(frame("changes", {"changed": changed, "removed": removed}))

    def _ping(self):
        self._keepalive = None
        if self.closed:
            return
        self._write(KEEPALIVE)
        self._keepalive = self.clock.callLater(self.settings.stream_keepalive, self._ping)

    # -- writing, bounded -------------------------------------------------------

    def _write(self, data):
        if self.closed:
            return
        if self.paused:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > self.settings.stream_buffer_bytes:
                self.cut_off(f"more than {self.settings.stream_buffer_bytes} bytes of events "
                             "waiting (stream_buffer_bytes): the browser does not read them")
            return
        self.events_sent += 1
        self.request.write(data)

    # IPushProducer: the connection's buffer is full / has room again.
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        held, self._held, self._held_bytes = self._held, [], 0
        for data in held:
            if self.paused or self.closed:
                self._held.append(data)
                self._held_bytes += len(data)
                continue
            self.events_sent += 1
            self.request.write(data)

    def stopProducing(self):
        self._cleanup()

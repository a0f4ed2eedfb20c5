"""Pushing VM changes to connected clients: the delta protocol that stands
in for one pb.Cacheable per VM (PB caps a connection at 1,024 referenced
objects, and jelly is too slow for tens of thousands of records).

A client subscribes once (optionally to some clusters only) and receives a
snapshot; afterwards every change to a VM it may see is queued, coalesced
per VM, and pushed in one batch per reactor turn with a sequence number so
the client can detect a gap and re-subscribe. A change is copied and
JSON-encoded once per turn however many subscriptions carry it (one user's
50 open clients would otherwise encode each change 50 times).

A subscription carries only its user's own VMs (an administrator's too, and
whatever the controller's user_visibility): a client's cache is its user's
VMs, and nothing about another user's VM is ever pushed; other VMs are for
``list`` to show, as the site allows.
"""

from twisted.logger import Logger

from usher.records import chunk_texts, encode_chunks, encode_item

log = Logger()


class Subscription:
    def __init__(self, hub, user, admin, clusters, sink):
        self.hub = hub
        self.user = user
        self.admin = admin
        self.clusters = set(clusters) if clusters else None
        self.sink = sink            # sink(seq, changed chunks, removed names) -> Deferred
        self.seq = 0
        self._changed = {}
        self._removed = set()
        self.active = True

    def wants(self, record):
        # Never another user's VM (see the module docstring).
        if record.get("owner") != self.user:
            return False
        return self.clusters is None or record.get("cluster") in self.clusters

    def snapshot(self, state):
        records = [r for r in state.vms.values() if self.wants(r)]
        return {"seq": self.seq, "chunks": encode_chunks(records)}

    def queue(self, record, copy=None):
        """Queue a change of ``record``; ``copy``: a copy of it taken now,
        shared with the other subscriptions queueing the same change."""
        name = record["name"]
        if record["state"] is None:
            self._changed.pop(name, None)
            self._removed.add(name)
        else:
            self._removed.discard(name)
            self._changed[name] = dict(record) if copy is None else copy

    def flush(self, encoded=None):
        """Push what is queued. ``encoded``: name -> (copy, its JSON text),
        shared by the subscriptions flushed in the same turn; a text is
        reused only for the very copy it was made of (a subscription that
        stopped wanting a record in the turn holds an older copy)."""
        if not (self._changed or self._removed) or not self.active:
            return
        if encoded is None:
            encoded = {}
        texts = []
        for name, record in self._changed.items():
            cached = encoded.get(name)
            if cached is not None and cached[0] is record:
                text = cached[1]
            else:
                text = encode_item(record)
                encoded[name] = (record, text)
            texts.append(text)
        removed = sorted(self._removed)
        self._changed, self._removed = {}, set()
        self.seq += 1
        d = self.sink(self.seq, chunk_texts(texts), removed)
        if d is not None:
            d.addErrback(lambda f: log.info("dropping update for {user}: {error}",
                                            user=self.user, error=f.getErrorMessage()))

    def close(self):
        self.active = False
        self.hub.remove(self)


class SubscriptionHub:
    def __init__(self, state, clock):
        self.state = state
        self.clock = clock
        self._by_user = {}          # user -> set of subscriptions
        self._pending = set()
        self._scheduled = None
        state.listen(self._changed)

    def add(self, user, admin, clusters, sink):
        sub = Subscription(self, user, admin, clusters, sink)
        self._by_user.setdefault(user, set()).add(sub)
        return sub

    def remove(self, sub):
        subs = self._by_user.get(sub.user)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_user[sub.user]
        self._pending.discard(sub)

    def __len__(self):
        return sum(len(subs) for subs in self._by_user.values())

    def _changed(self, record, old_state):
        copy = None
        for sub in self._by_user.get(record.get("owner"), ()):
            if sub.wants(record):
                if copy is None:
                    copy = dict(record)
                sub.queue(record, copy)
                self._pending.add(sub)
        if self._pending and self._scheduled is None:
            self._scheduled = self.clock.callLater(0, self._flush)

    def flush_now(self):
        """Push what is queued now, not at the end of the reactor turn (a
        request's answer is about to leave)."""
        if self._scheduled is not None:
            if self._scheduled.active():
                self._scheduled.cancel()
            self._flush()

    def _flush(self):
        self._scheduled = None
        pending, self._pending = self._pending, set()
        encoded = {}
        for sub in pending:
            try:
                sub.flush(encoded)
            except Exception:
                # (e.g. a record a plugin made too large to send) The others
                # are still pushed; this one's next push shows a gap.
                log.failure("pushing VM changes to {user} failed", user=sub.user)

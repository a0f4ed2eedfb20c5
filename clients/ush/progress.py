"""The user's own commands in flight (start, the operations, migrate): what
they change is reported once, in their result, and how far they are.

While one runs, the [notice] lines of VM changes are held; when it ends,
those of the VMs its result names are dropped (the result says it) and the
others are printed after its result. A notice arriving just after the result
(REPORTED_WINDOW) of the change it reported is dropped too, once. Its progress is counted from the same change
notifications the client gets for the user's VMs: ``OwnCommand.line()`` is
the one line of counts that one-shot mode redraws on a terminal.
"""

from usher import states

from .format import PAST_TENSE

# The result's lists that name VMs, by command kind.
RESULT_LISTS = ("started", "done", "migrated", "failed")
# Carriage return and erase to the end of the line: redraw one line.
REDRAW = "\r\x1b[K"
# Seconds between two redraws of the line of progress (at most).
REDRAW_INTERVAL = 0.1
# Seconds after a result during which the notice of a change it reported may
# still arrive (the notification and the result cross): dropped then, once.
REPORTED_WINDOW = 2.0
# A result entry that names a VM without its state (started, migrated): the
# next change notice of that VM, whatever it says, is the one it reported.
ANY_STATE = object()


class OwnCommand:
    """One of the user's commands in flight: ``kind`` is "start", "migrate"
    or an operation; ``total`` the number of VMs asked for, when known."""

    def __init__(self, kind, total=None):
        self.kind = kind
        self.total = total
        self.latest = {}       # VM name -> its latest (state, host)
        self.first = {}        # VM name -> (state, host) before its first change
        self.removed = set()
        self.named = set()     # the VMs its result names
        self.reported = {}     # VM name -> the state its result gives (None:
                               # removed; ANY_STATE: not given)

    def saw(self, name, old, new):
        self.first.setdefault(name, old)
        self.latest[name] = new
        self.removed.discard(name)

    def saw_removed(self, name):
        self.removed.add(name)

    def report(self, result):
        """The command's result: the VMs it names are reported there, with
        the state it gives them (a failed VM's is none: its next change is
        news)."""
        for key in RESULT_LISTS:
            for item in (result or {}).get(key) or ():
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    self.named.add(item["name"])
                    if key != "failed":
                        self.reported[item["name"]] = item.get("state", ANY_STATE)

    def line(self):
        """The counts so far, one line."""
        seen = [name for name in self.latest if name not in self.removed]
        latest = [self.latest[name][0] for name in seen]
        if self.kind == "start":
            started = sum(1 for s in latest if s in (states.RUN, states.PAUSED))
            starting = latest.count(states.STARTING)
            failed = len(self.removed) + latest.count(states.LOST)
            of = f" of {self.total}" if self.total else ""
            return (f"start: {started}{of} started, {starting} starting, "
                    f"{failed} failed so far")
        if self.kind == "migrate":
            migrating = latest.count(states.MIGRATING)
            moved = sum(1 for name in seen
                        if self.latest[name][0] != states.MIGRATING
                        and self.first.get(name) is not None
                        and self.latest[name][1] != self.first[name][1])
            return f"migrate: {moved} moved, {migrating} migrating so far"
        target = states.OPERATION_RESULT.get(self.kind)
        done = (sum(1 for s in latest if s == target) if target
                else len(self.removed))
        waiting = sum(1 for s in latest if s != target)
        past = PAST_TENSE.get(self.kind, self.kind)
        return f"{self.kind}: {done} {past}, {waiting} in progress so far"


class OwnCommands:
    """The shell's commands in flight, the notices they hold and the line of
    progress (``show`` on a terminal in one-shot mode, ``clear`` before the
    result)."""

    def __init__(self, notice, out, clock=None):
        self._notice = notice
        self._out = out
        self._clock = clock
        self._drawn_at = None
        self.running = []
        self._held = []          # (VM name, text) of notices held meanwhile
        # VM name -> (the state its command's result gave, when): a notice
        # of that change arriving just after the result is news no more.
        self._reported = {}
        self.show_progress = False
        self._shown = False

    def begin(self, kind, total=None):
        command = OwnCommand(kind, total)
        self.running.append(command)
        return command

    def end(self, command):
        self.running.remove(command)
        self.clear()
        now = self._now()
        self._reported.update((name, (state, now))
                              for name, state in command.reported.items())
        self._held = [(name, text) for name, text in self._held
                      if name not in command.named]

    def _now(self):
        return self._clock.seconds() if self._clock is not None else None

    def _said(self, name, state):
        """Whether the result of one of our commands already said that VM
        ``name`` is now in ``state`` (None: removed); asked once per VM."""
        said = self._reported.pop(name, None)
        if said is None:
            return False
        expected, at = said
        now = self._now()
        if at is not None and now is not None and now - at > REPORTED_WINDOW:
            return False
        return expected is ANY_STATE or expected == state

    def flush(self):
        """After a result is printed: the notices held meanwhile, once no
        command of ours runs."""
        if not self.running:
            held, self._held = self._held, []
            for _name, text in held:
                self._notice(text)

    def changed(self, name, old, new, text):
        """A VM changed (``text`` its notice, or None): -> True if the
        notice is held or dropped here, False to print it now."""
        if self._said(name, new[0]):
            return True                # its command's result said it already
        if not self.running:
            return False
        for command in self.running:
            command.saw(name, old, new)
        if text:
            self._held.append((name, text))
        self.progress()
        return True

    def removed(self, name, text):
        if self._said(name, None):
            return True
        if not self.running:
            return False
        for command in self.running:
            command.saw_removed(name)
        self._held.append((name, text))
        self.progress()
        return True

    def progress(self):
        if not self.running or not self.show_progress:
            return
        now = self._now()
        if now is not None and self._drawn_at is not None and (
                now - self._drawn_at < REDRAW_INTERVAL):
            return
        self._drawn_at = now
        self.show(self.running[-1].line())

    def show(self, line):
        """Redraw the line of progress (one-shot mode, on a terminal) ->
        whether it was shown."""
        if not self.show_progress:
            return False
        self._write(REDRAW + line)
        self._shown = True
        return True

    def clear(self):
        if self._shown:
            self._write(REDRAW)
            self._shown = False

    def _write(self, text):
        self._out.write(text)
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()


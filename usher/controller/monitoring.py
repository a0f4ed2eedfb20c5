"""The controller's consolidated monitoring figures (paper: "The controller
is responsible for consolidating monitoring data sent by the local node
managers into a format accessible by the rest of the system").

Each LNM reports every ``status_report_interval`` seconds the 1/5/15-minute
averages of its node and of every VM it runs (``usher.protocol``,
Monitoring); since issue 16 mostly as deltas: the VMs whose figures changed
in full, the others named as kept (``usher.protocol``, report_status), so
that an idle fleet costs little more than its node figures. ``Monitoring``
keeps the latest figures per LNM and per VM and a short history of the
1-minute averages, and answers clients (``list -s``, ``list_lnm -s``,
``top``), plugins (``PluginAPI.monitoring``) and the Prometheus exporter.

Memory stays bounded and small at the scale Usher targets (10,000 VMs on 500
LNMs): the latest figures of a VM are one array of 18 doubles (6 figures x 3
windows, NaN where unavailable), its history a ring of ``vm_history`` rows
of 6 float32 (one row every ``history_interval`` seconds at most), and a VM's
entry goes when its LNM stops reporting it, when the VM is removed, or when
its LNM disconnects. Entries are replaced, never changed in place, so a
reader holding one (the exporter, in a thread) sees a consistent set.

For plugins (e.g. least-loaded placement)::

    monitoring = event.api.monitoring
    load = monitoring.lnm_load("vmm47")     # a Load, or None before any report
    load.cpu                                 # Averages(one, five, fifteen) or None
    load.cpu.one                             # percent of the host, 1-minute average
    load.age                                 # seconds since the report arrived
    monitoring.lnm_figure("vmm47", "cpu", 5) # -> float or None: shortcut
    monitoring.lnm_loads()                   # {lnm name: Load} for connected LNMs
    monitoring.vm_load("1.sneetch.alice.usher.local")   # the same for a VM
    monitoring.history("vmm47")              # [(time, {figure: 1-minute average})]
"""

import heapq
import math
from array import array
from collections import namedtuple

from twisted.logger import Logger

from usher.controller.lnm_input import MAX_COUNT, MAX_FIGURE, are_names, is_figure
from usher.errors import InvalidRequest
from usher.naming import MAX_NAME, is_host_vm_name
from usher.protocol import AVERAGE_WINDOWS, FIGURES, MAX_REQUEST_NAMES

log = Logger()

WINDOW_MINUTES = tuple(int(w // 60) for w in AVERAGE_WINDOWS)     # (1, 5, 15)
_SLOTS = len(FIGURES) * len(AVERAGE_WINDOWS)
_NAN = float("nan")
# Node fields besides the figures, and the types they may have.
_NODE_COUNTS = ("vms", "cpus", "memory_mib", "free_memory_mib")
MAX_SOURCE = 64

Averages = namedtuple("Averages", "one five fifteen")
Averages.__doc__ = "A figure's 1-, 5- and 15-minute averages."


class Load(namedtuple("Load", FIGURES + ("age", "source", "extra"))):
    """The figures of a VM or an LNM: one ``Averages`` (or None when
    unavailable) per figure of ``usher.protocol.FIGURES``, ``age`` (seconds
    since the report arrived), ``source`` ("libvirt", "simulated:<profile>",
    both joined by "+", or None) and ``extra`` (an LNM's vms, cpus,
    memory_mib, free_memory_mib; {} for a VM)."""

    __slots__ = ()

    def figure(self, figure, window=1):
        """One average (window 1, 5 or 15 minutes) or None."""
        averages = getattr(self, figure)
        if averages is None:
            return None
        return averages[_window_index(window)]


def _window_index(window):
    try:
        return WINDOW_MINUTES.index(int(window))
    except (ValueError, TypeError):
        raise InvalidRequest(f"window must be one of {WINDOW_MINUTES} (minutes), "
                             f"not {window!r}") from None


def _figure_index(figure):
    try:
        return FIGURES.index(figure)
    except ValueError:
        raise InvalidRequest(f"unknown figure {figure!r}; the figures are "
                             f"{', '.join(FIGURES)}") from None


def _number(value):
    """A finite float, or an int a float holds exactly (a huge int would
    overflow ``float``)."""
    if type(value) is float:
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 1 << 53


_UNAVAILABLE = array("d", [_NAN]) * _SLOTS
_BASES = tuple((figure, index * len(AVERAGE_WINDOWS)) for index, figure in enumerate(FIGURES))


def pack_figures(report, what=None):
    """A report's figures -> array of 18 doubles (NaN: unavailable).
    Raises InvalidRequest naming ``what`` (if given) and the figure that is
    wrong.

    Every VM of every LNM goes through here on each status report, hence
    the fast path for what LNMs send: three floats (the range test fails
    for NaN and infinities; no figure is negative)."""
    packed = array("d", _UNAVAILABLE)
    for figure, base in _BASES:
        value = report.get(figure)
        if value is None:
            continue
        if type(value) is list and len(value) == 3:
            a, b, c = value
            if (type(a) is float and type(b) is float and type(c) is float
                    and 0.0 <= a <= MAX_FIGURE and 0.0 <= b <= MAX_FIGURE
                    and 0.0 <= c <= MAX_FIGURE):
                packed[base] = a
                packed[base + 1] = b
                packed[base + 2] = c
                continue
        if (not isinstance(value, (list, tuple)) or len(value) != len(AVERAGE_WINDOWS)
                or not all(is_figure(v) for v in value)):
            raise InvalidRequest(f"{_prefix(what)}figure {figure} must be None or "
                                 f"{len(AVERAGE_WINDOWS)} finite numbers from 0 to "
                                 f"{MAX_FIGURE:g}")
        for offset, v in enumerate(value):
            packed[base + offset] = float(v)
    return packed


def _unpack(values):
    """array of 18 -> {figure: [3 floats] or None}."""
    width = len(AVERAGE_WINDOWS)
    figures = {}
    for index, figure in enumerate(FIGURES):
        row = values[index * width:(index + 1) * width]
        figures[figure] = None if math.isnan(row[0]) else list(row)
    return figures


def _prefix(what):
    return f"{what}: " if what else ""


def _source(report, what=None):
    source = report.get("source")
    if source is not None and (not isinstance(source, str) or len(source) > MAX_SOURCE):
        raise InvalidRequest(f"{_prefix(what)}source must be a short string or None")
    return source


class History:
    """A ring of timed rows of the 1-minute averages (float32, NaN where
    unavailable), at most one row per ``interval`` seconds."""

    __slots__ = ("times", "values", "start", "count", "interval", "last")

    def __init__(self, capacity, interval):
        self.times = array("d", [0.0]) * capacity
        self.values = array("f", [_NAN]) * (capacity * len(FIGURES))
        self.start = 0
        self.count = 0
        self.interval = interval
        self.last = -math.inf        # the time of the latest row

    @property
    def capacity(self):
        return len(self.times)

    def add(self, now, packed):
        """Append the 1-minute averages of ``packed`` unless the last row is
        younger than ``interval``."""
        if now - self.last < self.interval:
            return
        capacity = len(self.times)
        if not capacity:
            return
        self.last = now
        if self.count < capacity:
            slot = (self.start + self.count) % capacity
            self.count += 1
        else:
            slot = self.start
            self.start = (self.start + 1) % capacity
        self.times[slot] = now
        width = len(AVERAGE_WINDOWS)
        for index in range(len(FIGURES)):
            self.values[slot * len(FIGURES) + index] = packed[index * width]

    def rows(self):
        """-> [(time, {figure: 1-minute average or None})], oldest first."""
        capacity = self.capacity
        rows = []
        for n in range(self.count):
            slot = (self.start + n) % capacity
            base = slot * len(FIGURES)
            rows.append((self.times[slot], {
                figure: (None if math.isnan(self.values[base + i])
                         else float(self.values[base + i]))
                for i, figure in enumerate(FIGURES)}))
        return rows


class _Entry:
    """The latest figures of a VM or an LNM (replaced whole on each report)."""

    __slots__ = ("lnm", "received_at", "sampled_at", "source", "values", "extra",
                 "history")

    def __init__(self, lnm, received_at, sampled_at, source, values, extra=None,
                 history=None):
        self.lnm = lnm
        self.received_at = received_at
        self.sampled_at = sampled_at
        self.source = source
        self.values = values
        self.extra = extra
        self.history = history      # a VM's History (the Monitoring's too), or None


class Monitoring:
    """Latest figures per LNM and per VM, and their short histories.

    ``state`` is the controller's GlobalState (a report may only give figures
    for VMs the state places on the reporting LNM, and a removed VM's
    figures go); ``clock`` gives the time reports arrive.
    """

    def __init__(self, state, clock, *, lnm_history=60, vm_history=15,
                 history_interval=60.0):
        if lnm_history < 0 or vm_history < 0 or history_interval <= 0:
            raise ValueError("history lengths must be >= 0 and the interval positive")
        self.state = state
        self.clock = clock
        self.lnm_history = lnm_history
        self.vm_history = vm_history
        self.history_interval = history_interval
        self._lnms = {}          # LNM name -> _Entry
        self._vms = {}           # VM name -> _Entry
        self._by_lnm = {}        # LNM name -> set of VM names with figures
        self._lnm_histories = {}
        self._vm_histories = {}
        self.reports = 0
        self.ignored_vms = 0     # figures for VMs the state does not place there
        state.listen(self._state_changed)

    # -- reports ---------------------------------------------------------------

    def report(self, lnm, node, vms, kept=(), resend=None):
        """An LNM's status report: its node's figures (dict), its VMs' (list
        of dicts) and ``kept``, the names of the VMs whose figures are
        unchanged since its last acknowledged report (usher.protocol,
        report_status). All or nothing: a malformed report changes nothing
        and raises InvalidRequest. The names of this report's VMs whose
        figures the controller does not hold after it (kept names it cannot
        keep, figures it did not take) are appended to ``resend`` (a list),
        if given. -> how many VMs' figures are held."""
        if not isinstance(node, dict):
            raise InvalidRequest(f"status report from {lnm}: node figures must be a dict")
        if not isinstance(vms, (list, tuple)) or len(vms) > MAX_REQUEST_NAMES:
            raise InvalidRequest(f"status report from {lnm}: VM figures must be a list of "
                                 f"at most {MAX_REQUEST_NAMES}")
        if kept is None:
            kept = ()
        if not isinstance(kept, (list, tuple)) or len(vms) + len(kept) > MAX_REQUEST_NAMES:
            raise InvalidRequest(f"status report from {lnm}: kept VMs must be a list, with "
                                 f"the VM figures at most {MAX_REQUEST_NAMES}")
        now = self.clock.seconds()
        node_values = pack_figures(node, f"status report from {lnm}")
        extra = {}
        for key in _NODE_COUNTS:
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_COUNT):
                raise InvalidRequest(f"status report from {lnm}: {key} must be a "
                                     f"non-negative integer (at most {MAX_COUNT}) or None")
            extra[key] = value
        profile = node.get("simulated_load")
        if profile is not None and (not isinstance(profile, str) or len(profile) > MAX_SOURCE):
            raise InvalidRequest(f"status report from {lnm}: simulated_load must be a "
                                 "short string")
        extra["simulated_load"] = profile
        interval = node.get("sample_interval")
        extra["sample_interval"] = float(interval) if _number(interval) else None
        node_entry = _Entry(lnm, now, _sampled_at(node), _source(node, f"node {lnm}"),
                            node_values, extra)
        placed_here = self._placed_here(lnm)
        entries = {}
        for vm in vms:
            name = vm.get("name") if isinstance(vm, dict) else None
            # A name the state places here was checked when its record was
            # made; any other is checked now (it may still be refused below).
            if type(name) is str and placed_here(name):
                here = True
            elif is_host_vm_name(name):
                here = False
            else:
                raise InvalidRequest(f"status report from {lnm}: a VM's figures without "
                                     "a valid name")
            try:
                entries[name] = (here, _Entry(lnm, now, _sampled_at(vm), _source(vm),
                                              pack_figures(vm)))
            except InvalidRequest as e:
                raise InvalidRequest(f"status report from {lnm}, VM {name}: {e}") from None
        if kept:
            if not are_names(kept):
                raise InvalidRequest(f"status report from {lnm}: kept VMs must be named "
                                     f"by strings of 1 to {MAX_NAME} characters")
            if len(set(kept)) != len(kept) or not entries.keys().isdisjoint(kept):
                raise InvalidRequest(f"status report from {lnm}: a VM is named twice "
                                     "(kept, or kept and sent)")
        # Checked: now apply.
        previous = self._lnms.get(lnm)
        self._lnms[lnm] = node_entry
        self._history(self._lnm_histories, lnm, self.lnm_history, now, node_values)
        held = set()
        for name, (here, entry) in entries.items():
            if not here:
                self.ignored_vms += 1
                if resend is not None:
                    resend.append(name)
                continue
            entry.history = self._history(self._vm_histories, name, self.vm_history, now,
                                          entry.values)
            self._vms[name] = entry
            held.add(name)
        if kept:
            self._keep(lnm, kept, now, node_entry, previous, held, resend, placed_here)
        for name in self._by_lnm.get(lnm, set()) - held:
            self._drop_vm(name, lnm)
        self._by_lnm[lnm] = held
        self.reports += 1
        return len(held)

    def _keep(self, lnm, kept, now, node_entry, previous, held, resend, placed_here):
        """Refresh the figures of the kept VMs held from ``lnm`` and placed
        on it; the others go to ``resend``. A VM's ``sampled_at`` moves
        with the node's (it was unchanged relative to it). Every VM of an
        idle fleet comes through here on each report, hence the inlining."""
        shift = None
        if (previous is not None and previous.sampled_at is not None
                and node_entry.sampled_at is not None):
            shift = node_entry.sampled_at - previous.sampled_at
        vms = self._vms
        info = self.state.lnms.get(lnm)
        placed = info.vms if info is not None else ()
        capacity, interval = self.vm_history, self.history_interval
        for name in kept:
            entry = vms.get(name)
            if entry is not None and entry.lnm == lnm and (name in placed
                                                           or placed_here(name)):
                sampled_at = entry.sampled_at
                if sampled_at is not None and shift is not None:
                    sampled_at += shift
                values, history = entry.values, entry.history
                if history is None and capacity:
                    history = self._vm_histories.get(name)
                    if history is None:
                        history = self._vm_histories[name] = History(capacity, interval)
                if history is not None and now - history.last >= interval:
                    history.add(now, values)
                vms[name] = _Entry(lnm, now, sampled_at, entry.source, values, None,
                                   history)
                held.add(name)
                continue
            if resend is not None:
                resend.append(name)

    def _placed_here(self, lnm):
        """-> whether(name) the state places a VM of that name on ``lnm``.
        The LNM's index of its VMs (LNMInfo.vms, .unmanaged) answers first;
        what it does not know, the records (``_placed_on``)."""
        state = self.state
        info = state.lnms.get(lnm)
        if info is None:
            return lambda name: self._placed_on(name, lnm)
        managed, here, unmanaged_here = state.vms, info.vms, info.unmanaged
        placed_on = self._placed_on

        def placed_here(name):
            return (name in here or (name in unmanaged_here and name not in managed)
                    or placed_on(name, lnm))

        return placed_here

    def _placed_on(self, name, lnm):
        record = self.state.vms.get(name) or self.state.unmanaged.get(name)
        return record is not None and record.get("lnm") == lnm

    def _history(self, histories, key, capacity, now, values):
        """Add to ``key``'s history -> it (None without history)."""
        if not capacity:
            return None
        history = histories.get(key)
        if history is None:
            history = histories[key] = History(capacity, self.history_interval)
        history.add(now, values)
        return history

    def _drop_vm(self, name, lnm=None):
        entry = self._vms.get(name)
        if entry is None or (lnm is not None and entry.lnm != lnm):
            return
        del self._vms[name]
        self._vm_histories.pop(name, None)
        names = self._by_lnm.get(entry.lnm)
        if names is not None:
            names.discard(name)

    def lnm_detached(self, lnm):
        """The LNM went away: its VMs' figures go (they are lost); its own
        stay, aging, with their history."""
        for name in list(self._by_lnm.pop(lnm, ())):
            entry = self._vms.get(name)
            if entry is not None and entry.lnm == lnm:
                del self._vms[name]
                self._vm_histories.pop(name, None)

    def forget_lnm(self, lnm):
        self.lnm_detached(lnm)
        self._lnms.pop(lnm, None)
        self._lnm_histories.pop(lnm, None)

    def _state_changed(self, record, old_state):
        if record.get("state") is None:
            self._drop_vm(record["name"])

    # -- wire form (clients) ------------------------------------------------------

    def _wire(self, entry):
        data = _unpack(entry.values)
        data["age"] = round(self.clock.seconds() - entry.received_at, 3)
        data["sampled_at"] = entry.sampled_at
        data["source"] = entry.source
        return data

    def vm_status(self, name):
        """A VM's figures as ``list -s`` sends them ({} without figures)."""
        entry = self._vms.get(name)
        return self._wire(entry) if entry is not None else {}

    def lnm_status(self, lnm):
        """An LNM's figures as ``list_lnm -s`` sends them ({} before any
        report)."""
        entry = self._lnms.get(lnm)
        if entry is None:
            return {}
        data = self._wire(entry)
        data.update(entry.extra)
        return data

    # -- plugins ------------------------------------------------------------------------

    def _load(self, entry):
        figures = _unpack(entry.values)
        return Load(**{figure: Averages(*values) if values is not None else None
                       for figure, values in figures.items()},
                    age=self.clock.seconds() - entry.received_at, source=entry.source,
                    extra=dict(entry.extra or {}))

    def lnm_load(self, lnm):
        """The latest figures of an LNM's host (a Load), or None before its
        first report. Check ``age`` and whether the LNM is connected."""
        entry = self._lnms.get(lnm)
        return self._load(entry) if entry is not None else None

    def vm_load(self, name):
        entry = self._vms.get(name)
        return self._load(entry) if entry is not None else None

    def lnm_loads(self, connected_only=True):
        """{LNM name: Load} for every LNM with figures (connected ones only
        by default)."""
        loads = {}
        for lnm, entry in self._lnms.items():
            lnm_info = self.state.lnms.get(lnm)
            if connected_only and (lnm_info is None or not lnm_info.connected):
                continue
            loads[lnm] = self._load(entry)
        return loads

    def lnm_figure(self, lnm, figure="cpu", window=1):
        """One average of an LNM's host (cpu: percent of the host), or None."""
        return self._figure(self._lnms.get(lnm), figure, window)

    def vm_figure(self, name, figure="cpu", window=1):
        """One average of a VM (cpu: percent of one host CPU), or None."""
        return self._figure(self._vms.get(name), figure, window)

    @staticmethod
    def _figure(entry, figure, window):
        slot = _figure_index(figure) * len(AVERAGE_WINDOWS) + _window_index(window)
        if entry is None or math.isnan(entry.values[slot]):
            return None
        return entry.values[slot]

    def busiest_vms(self, lnms=None, count=10, figure="cpu", window=1):
        """-> [(VM name, value)] of the ``count`` VMs with the highest
        average (on the given LNMs, or all), highest first."""
        slot = _figure_index(figure) * len(AVERAGE_WINDOWS) + _window_index(window)
        if lnms is None:
            names = self._vms.keys()
        else:
            names = [n for lnm in lnms for n in self._by_lnm.get(lnm, ())]
        candidates = ((name, self._vms[name].values[slot]) for name in names)
        return heapq.nlargest(count, ((n, v) for n, v in candidates if not math.isnan(v)),
                              key=lambda item: item[1])

    def history(self, lnm):
        """An LNM's history: [(controller time, {figure: 1-minute average})]."""
        history = self._lnm_histories.get(lnm)
        return history.rows() if history is not None else []

    def vm_history_rows(self, name):
        history = self._vm_histories.get(name)
        return history.rows() if history is not None else []

    # -- exporter -----------------------------------------------------------------------

    def snapshot(self):
        """-> (LNM entries, VM entries): lists of (name, entry) to read from
        another thread. Call it on the reactor thread; entries are never
        changed once stored."""
        return list(self._lnms.items()), list(self._vms.items())

    def __len__(self):
        return len(self._vms)


class NoInstruments:
    """The controller's instruments when no metrics are exported: every
    observation is dropped (``usher.controller.metrics`` records them)."""

    def request(self, kind, outcome, seconds):
        pass

    def chain(self, event, outcome, seconds):
        pass


def _sampled_at(report):
    value = report.get("sampled_at")
    return float(value) if _number(value) else None

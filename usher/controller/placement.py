"""The common part of placement plugins.

A placement plugin sits on ``start_request`` and ``migrate_request``, after
authorization. For every VM still in the request it picks an LNM with
``request.place(vm, lnm)``, or drops the VM with a reason that names each
LNM it considered and why that LNM could not take it. Subclasses only say in
which order to try the candidate hosts (``rank``); capacity, the caller's
suggestion, hosts to avoid and the wording of refusals are handled here, the
same for every policy.

Options (``PLACEMENT_SPEC``, after ``usher.controller.capacity.CAPACITY_SPEC``):

``suggestion``
    What to do with the LNMs the caller suggested: ``require`` (only those;
    the default: "migrate 3.sneetch vmm52" means vmm52), ``prefer`` (those
    first, then any other) or ``ignore``.
``avoid``
    LNMs never chosen for new VMs or migrations (hosts being drained for
    maintenance); their VMs keep running.

A VM being started again (``start NAME`` of a shut-off VM) stays on its host:
the plugin only checks that the host still has room for it. A VM in the
request's ``relocate`` (an HA restart: its host was fenced) is placed like a
migration, off the host it leaves.

Held hosts (maintenance, fenced, powered down: ``usher.controller.holds``)
are refused with the hold's reason by the ``Ledger``.

``affinity``
    How the virtual clusters' affinity rules (``usher.controller.affinity``:
    ``apart``, ``together``) are honoured: ``strict`` (the default: a VM no
    host can take under its rule is dropped, the reason naming the rule and
    each host) or ``best_effort`` (placed anyway, with a note saying which
    rule was not met). They apply to new VMs, VMs started again, HA
    restarts and migration targets.
"""

from __future__ import annotations

from usher import errors
from usher.controller.affinity import PlacementCheck
from usher.controller.capacity import CAPACITY_SPEC, CapacityPolicy, Ledger
from usher.naming import DEFAULT_CLUSTER, cluster_of, split

PLACEMENT_SPEC = """
suggestion = option('require', 'prefer', 'ignore', default='require')
avoid = list(default=list())
affinity = option('strict', 'best_effort', default='strict')
""" + CAPACITY_SPEC


# Hosts named before "and N other LNMs" when many give the same reason.
MAX_NAMED_HOSTS = 4


def reasons_text(reasons: dict) -> str:
    """"host: why; ...", hosts that give the same reason together
    ("lnm1, lnm2: why"), so that 500 full hosts make one short reason."""
    hosts_by_reason = {}
    for host, why in sorted(reasons.items()):
        hosts_by_reason.setdefault(why, []).append(host)
    parts = []
    for why, hosts in hosts_by_reason.items():
        named = ", ".join(hosts[:MAX_NAMED_HOSTS])
        if len(hosts) > MAX_NAMED_HOSTS:
            named += f" and {len(hosts) - MAX_NAMED_HOSTS} other LNMs"
        parts.append(f"{named}: {why}")
    return "; ".join(parts)


def identity(vm, record, request, domain):
    """-> (owner, virtual cluster) of a VM in a request (new VMs have no
    record yet: the controller derives both from the name and arguments)."""
    if record.get("owner"):
        return record["owner"], record.get("cluster") or DEFAULT_CLUSTER
    parts = split(vm, domain)
    if parts is None:
        return request.user, request.args.get("cluster") or DEFAULT_CLUSTER
    short, owner = parts
    return owner, request.args.get("cluster") or cluster_of(short)


class PlacementPlugin:
    """Base class: ``Plugin(config, api)`` of a placement policy module."""

    name = "placement"
    order = None
    # Subclasses name the policy in notes and refusals.
    policy = "placement"

    def __init__(self, config, api):
        self.api = api
        self.config = dict(config)
        self.order = config.get("order")
        self.suggestion = config.get("suggestion") or "require"
        self.avoid = set(config.get("avoid") or ())
        self.capacity = CapacityPolicy(config)
        # -- affinity (issue 15) --
        self.affinity_policy = config.get("affinity") or "strict"
        self._affinity = None

    # -- what subclasses provide -------------------------------------------------

    def rank(self, vm, demand, candidates, ledger, request):
        """-> the candidate host names in the order to try them (subclasses)."""
        return sorted(candidates)

    def begin(self, request, ledger):
        """Called once per request before any VM is placed."""

    def placed(self, vm, host, demand, ledger, request):
        """Called after ``vm`` was placed on ``host``."""

    def refuse(self, vm, host, demand, ledger, request):
        """A policy-specific reason not to put ``vm`` on ``host`` (or None)."""
        return None

    def vm_identity(self, vm, request):
        return identity(vm, request.records.get(vm) or {}, request, self.api.state.domain)

    # -- the chain entry point -------------------------------------------------------

    def entry_point(self, event):
        request = event.request
        if request is None or request.kind not in ("start", "migrate"):
            return
        ledger = Ledger(self.api.state, self.capacity, default_memory=self.api.default_memory,
                        default_vcpus=self.api.default_vcpus)
        self.begin(request, ledger)
        # -- affinity (issue 15): the clusters' rules, as this request meets them --
        rules = getattr(self.api.state, "affinity", None)
        self._affinity = (None if rules is None else
                          PlacementCheck(rules, self.api.state, ledger, request,
                                         lambda name: self.vm_identity(name, request)))
        if request.lnms and self.suggestion == "ignore":
            request.note(f"{self.policy}: suggested LNMs are ignored by this site's policy")
        for vm in list(request.vms):
            record = request.records.get(vm) or {}
            existing = self.api.state.vms.get(vm)
            if vm in request.relocate:
                # An HA restart: a new host for the VM, as for a migration.
                self._place(vm, existing or record, request, ledger,
                            source=request.relocate[vm])
            elif request.kind == "start" and existing is not None and existing.get("lnm"):
                self._restart(vm, existing, request, ledger)
            else:
                self._place(vm, record, request, ledger)
            if self._affinity is not None:
                self._affinity.decided(vm)

    def _restart(self, vm, existing, request, ledger):
        host = existing["lnm"]
        demand = ledger.demand(existing)
        why = ledger.refusal(host, demand)
        if why is None and self._affinity is not None:
            why = self._affinity_refusal(vm, host, request)
        if why is not None:
            request.drop(vm, f"cannot start it again on its host {host}: {why}",
                         errors.NO_CAPACITY)
            return
        ledger.commit(host, demand, existing.get("owner"), existing.get("cluster"))
        request.place(vm, host)
        if self._affinity is not None:
            self._affinity.placed(vm, host)

    def _candidates(self, request, ledger, source):
        """-> (groups of hosts to try in turn, reasons for hosts left out)."""
        reasons = {}
        connected = set(ledger.hosts)
        for host in self.avoid & connected:
            reasons[host] = "being drained (listed in avoid)"
        usable = connected - self.avoid
        if source is not None and source in usable:
            usable.discard(source)
            reasons[source] = "the VM is already there"
        if not request.lnms or self.suggestion == "ignore":
            return [usable], reasons
        suggested = []
        for host in request.lnms:
            if host in usable:
                suggested.append(host)
            elif host not in connected:
                reasons[host] = "not connected"
        if self.suggestion == "require":
            # Hosts not suggested are not candidates; their reasons would only
            # confuse the user.
            reasons = {h: why for h, why in reasons.items() if h in request.lnms}
            return [set(suggested)], reasons
        return [set(suggested), usable - set(suggested)], reasons

    def _place(self, vm, record, request, ledger, source=None):
        migrating = request.kind == "migrate"
        relocating = vm in request.relocate
        if migrating:
            source = record.get("lnm")
            if source in request.lnms and self.suggestion != "ignore":
                # Asked to be where it is already: nothing to move (the
                # migration reports it "already").
                request.place(vm, source)
                return
        demand = ledger.demand(record, None if migrating or relocating else request.args)
        groups, reasons = self._candidates(request, ledger, source)
        chosen = None
        against_rule = None     # the first host refused by the affinity rule only
        for group in groups:
            ranked = self.rank(vm, demand, group, ledger, request)
            if self._affinity is not None:
                ranked = self._affinity.order(
                    vm, ranked, lambda n: ledger.demand(request.records.get(n) or {},
                                                        None if migrating else request.args))
            for host in ranked:
                why = (ledger.refusal(host, demand)
                       or self.refuse(vm, host, demand, ledger, request))
                if why is None and self._affinity is not None:
                    why = self._affinity.refusal(vm, host)
                    if why is not None and against_rule is None:
                        against_rule = (host, why)
                if why is not None:
                    reasons[host] = why
                    continue
                chosen = host
                break
            if chosen is not None:
                break
        if chosen is None and against_rule is not None and self.affinity_policy == "best_effort":
            chosen = against_rule[0]
            self._affinity_note(vm, *against_rule, request)
        if chosen is None:
            verb = ("migrate it" if migrating else
                    "restart it elsewhere" if relocating else "start it")
            where = "suggested LNM" if request.lnms and self.suggestion == "require" else "LNM"
            detail = reasons_text(reasons) or f"no {where} connected"
            request.drop(vm, f"no {where} can {verb} ({demand.describe()}): {detail}",
                         errors.NO_CAPACITY)
            return
        owner, cluster = self.vm_identity(vm, request)
        ledger.commit(chosen, demand, owner, cluster)
        if migrating and source is not None:
            ledger.release(source, demand, owner, cluster)
        request.place(vm, chosen)
        if self._affinity is not None:
            self._affinity.placed(vm, chosen)
        self.placed(vm, chosen, demand, ledger, request)

    # -- affinity (issue 15) --

    def _affinity_refusal(self, vm, host, request):
        """The rule's refusal of ``host`` for ``vm`` (None under best effort,
        with a note)."""
        why = self._affinity.refusal(vm, host)
        if why is not None and self.affinity_policy == "best_effort":
            self._affinity_note(vm, host, why, request)
            return None
        return why

    def _affinity_note(self, vm, host, why, request):
        parts = split(vm, self.api.state.domain)
        request.note(f"{self.policy}: {parts[0] if parts else vm} placed on {host} against "
                     f"its cluster's affinity rule ({host}: {why}); this site's affinity "
                     "policy is best_effort")

"""Affinity and anti-affinity rules of virtual clusters (OpenNebula's VM
groups, Nova's server groups), and the checks placement and the rebalancer
make with them.

A rule belongs to one virtual cluster ``(owner, cluster)``:

``apart``
    no two of its active VMs on one host (a host's failure takes one);
``together``
    all of its active VMs on one host (they talk to each other a lot).

Mechanism only: the rules live here, persisted in
``state_dir/affinity.json`` (in memory when the controller has no state
directory), and are set by a start's ``affinity`` argument (the core takes
it out of the request, ``take_start_arg``) or by the ``affinity`` request.
A rule stays until it is set to none, even while its cluster is empty
between runs. Who honours them: every placement plugin
(``usher.controller.placement.PlacementPlugin``: new VMs, VMs started
again, HA restarts and migration targets, so evacuation and HA restart too,
with the site's ``affinity = strict|best_effort``) through ``PlacementCheck``,
and the rebalancer, which never plans a move that breaks a rule
(``move_refusal``).
"""

import copy
from collections import Counter

from twisted.internet import defer
from twisted.logger import Logger

from usher import states
from usher.errors import InvalidRequest, PermissionDenied
from usher.naming import DEFAULT_CLUSTER, check_label, check_user, cluster_of, split
from usher.persist import read_json, remove_leftovers, write_json_atomic

log = Logger()

RULES = ("apart", "together")
POLICIES = ("strict", "best_effort")
STORE_NAME = "affinity"
FILE_NAME = "affinity.json"
# VMs that hold (or may hold) their host: those a rule is about.
ACTIVE_STATES = frozenset({states.RUN, states.PAUSED, states.STARTING, states.MIGRATING,
                           states.LOST, states.UNKNOWN})
# Names shown in a refusal, at most.
SHOWN_NAMES = 3
# Rules one owner may have: a rule may name a cluster with no VMs (yet), so
# without a bound one user could grow the file, and its rewrites, at will.
MAX_RULES_PER_OWNER = 1000


def check_rule(value, *, allow_none=True):
    """``apart``, ``together`` (or, with ``allow_none``, ``none``/None ->
    None); anything else is an InvalidRequest."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in RULES:
            return word
        if word == "none" and allow_none:
            return None
    choices = "apart, together" + (" or none" if allow_none else "")
    shown = repr(value[:20]) if isinstance(value, str) else type(value).__name__
    raise InvalidRequest(f"affinity must be {choices}, not {shown}")


def describe(member, rule):
    owner, cluster = member
    return f"affinity {rule} of cluster {cluster} ({owner})"


class AffinityRules:
    """The rules of every virtual cluster. ``api`` (the controller's
    PluginAPI) gives the thread pool the file is written in; without one
    (tests) it is written at once."""

    def __init__(self, state_dir=None, api=None, *, store=None):
        self.path = None if state_dir is None else f"{state_dir.rstrip('/')}/{FILE_NAME}"
        # The HA database (usher.controller.store.IStateStore, name
        # "affinity") instead of the file, when given.
        self.store = store
        if store is not None:
            self.path = None
        self.api = api
        self._rules = {}               # (owner, cluster) -> rule
        self._lock = defer.DeferredLock()
        self._dirty = False
        if self.path is not None or store is not None:
            self._load()

    def _load(self):
        try:
            if self.store is not None:
                data = self.store.load(STORE_NAME) or {}
            else:
                remove_leftovers(self.path)
                data = read_json(self.path, {})
        except (OSError, ValueError) as e:
            log.error("ignoring unreadable affinity rules {path}: {error}", path=self.path,
                      error=e)
            return
        for entry in (data.get("rules") if isinstance(data, dict) else None) or ():
            try:
                member = (check_user(entry["owner"]), check_label(entry["cluster"]))
                self._rules[member] = check_rule(entry["rule"], allow_none=False)
            except (KeyError, TypeError, InvalidRequest):
                log.warn("{path}: ignoring a malformed affinity rule {entry!r}",
                         path=self.path, entry=str(entry)[:200])

    # -- queries ------------------------------------------------------------

    def rule(self, owner, cluster):
        """-> ``apart``, ``together`` or None."""
        return self._rules.get((owner, cluster or DEFAULT_CLUSTER))

    def listing(self, owner=None):
        """-> [{"owner", "cluster", "rule"}] (of ``owner``, or all), sorted."""
        return [{"owner": o, "cluster": c, "rule": r}
                for (o, c), r in sorted(self._rules.items()) if owner in (None, o)]

    # -- changes ------------------------------------------------------------

    async def set(self, owner, cluster, rule):
        """Set (or, with None, remove) a cluster's rule; persisted before
        this returns. -> the rule."""
        member = (owner, cluster or DEFAULT_CLUSTER)
        if rule is None:
            if self._rules.pop(member, None) is None:
                return rule              # nothing to write
        else:
            rule = check_rule(rule, allow_none=False)
            if self._rules.get(member) == rule:
                return rule
            if member not in self._rules and self.count(owner) >= MAX_RULES_PER_OWNER:
                raise InvalidRequest(
                    f"{owner} already has {MAX_RULES_PER_OWNER} affinity rules: remove "
                    "some (affinity -n CLUSTER none) before setting more")
            self._rules[member] = rule
        await self._save()
        return rule

    def count(self, owner):
        return sum(1 for (o, _c) in self._rules if o == owner)

    async def _save(self):
        if self.store is not None:
            await self.store.save(STORE_NAME, {"rules": self.listing()})
            return
        if self.path is None:
            return
        # One write at a time, each of the rules as they are when it runs:
        # the last write has the latest rules; changes made while one waits
        # share the next write (a burst of requests is one or two writes).
        self._dirty = True
        async with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            data = {"rules": self.listing()}
            run = getattr(self.api, "run_in_thread", None)
            if run is None:
                write_json_atomic(self.path, data)
            else:
                await run(write_json_atomic, self.path, copy.deepcopy(data))

    # -- the requests -------------------------------------------------------

    async def answer(self, state, user, admin, cluster, rule):
        """The ``affinity(cluster, rule)`` request: read (``rule`` None) or
        set a rule (``none`` removes it). ``cluster`` may be
        ``owner/cluster`` (administrators, or the caller's own)."""
        owner, cluster = self._member_of(user, admin, cluster)
        if rule is not None:
            await self.set(owner, cluster, check_rule(rule))
        return self.summary(state, (owner, cluster))

    def _member_of(self, user, admin, cluster):
        if not isinstance(cluster, str) or not cluster or len(cluster) > 128:
            raise InvalidRequest("the cluster must be a name (or OWNER/CLUSTER)")
        owner, slash, name = cluster.strip().lower().rpartition("/")
        if not slash:
            owner = user
        check_user(owner)
        check_label(name, "cluster name")
        if owner != user and not admin:
            raise PermissionDenied(f"only administrators may set the affinity of another "
                                   f"user's cluster ({owner}/{name})")
        return owner, name

    def summary(self, state, member):
        """-> {"owner", "cluster", "rule", "vms", "hosts", "honoured"[, "note"]}."""
        rule = self._rules.get(member)
        names = state.clusters.get(member) or ()
        hosts = Counter(state.vms[n]["lnm"] for n in names
                        if n in state.vms and state.vms[n].get("lnm")
                        and state.vms[n]["state"] in ACTIVE_STATES)
        result = {"owner": member[0], "cluster": member[1], "rule": rule, "vms": len(names),
                  "hosts": dict(sorted(hosts.items())), "honoured": True}
        shared = sorted(h for h, count in hosts.items() if count > 1)
        if rule == "apart" and shared:
            result["honoured"] = False
            result["note"] = (f"VMs of the cluster share {', '.join(shared)}: the rule "
                              "applies to placements from now on (migrate them apart)")
        elif rule == "together" and len(hosts) > 1:
            result["honoured"] = False
            result["note"] = (f"the cluster runs on {', '.join(sorted(hosts))}: the rule "
                              "applies to placements from now on (migrate them together "
                              "in one request)")
        return result

    async def take_start_arg(self, state, domain, user, names, args):
        """A start's ``affinity`` argument, taken out of ``args``: sets the
        rule of the clusters of ``names`` (new VMs and VMs started again).
        A start that contradicts the rule of a cluster that has VMs is
        refused. -> a coroutine function undoing the change (the request was
        rejected), or None."""
        wanted = args.pop("affinity", None)
        if wanted is None:
            return None
        wanted = check_rule(wanted, allow_none=False)
        members = set()
        for name in names:
            record = state.vms.get(name)
            if record is not None and record.get("owner"):
                members.add((record["owner"], record.get("cluster") or DEFAULT_CLUSTER))
                continue
            parts = split(name, domain)
            short, owner = parts if parts is not None else (name, user)
            members.add((owner, args.get("cluster") or cluster_of(short)))
        changed = {}
        for member in sorted(members):
            current = self._rules.get(member)
            if current == wanted:
                continue
            if current is not None and state.clusters.get(member):
                raise InvalidRequest(
                    f"cluster {member[1]} has the rule affinity {current}; this start asks "
                    f"for {wanted}: start it without --affinity, or change the rule first "
                    f"(affinity -n {member[1]} {wanted})")
            changed[member] = current
        for member in changed:
            await self.set(*member, wanted)
        if not changed:
            return None

        async def undo():
            for member, previous in changed.items():
                await self.set(*member, previous)
        return undo


class PlacementCheck:
    """The rules as one placement request meets them. Built by the
    placement plugin per request, with its ``ledger`` (the VMs it places
    are committed there as it goes); ``identity(vm)`` -> (owner, cluster)."""

    def __init__(self, rules, state, ledger, request, identity):
        self.rules = rules
        self.state = state
        self.ledger = ledger
        self.request = request
        self.identity = identity
        # VMs of the request not decided yet that the ledger counts where
        # they are now (migrations): a cluster migrated together in one
        # request is not anchored to the host all of it is leaving.
        self.undecided = Counter()       # (host, member) -> VMs
        self._undecided_vm = {}          # vm -> (host, member)
        self.placed_here = {}            # host -> [vm] placed by this request
        self.moved = set()
        for vm in request.vms:
            record = state.vms.get(vm)
            if (request.kind == "migrate" and record is not None
                    and record["state"] in ACTIVE_STATES and record.get("lnm") in ledger.hosts):
                key = (record["lnm"], self.identity(vm))
                self.undecided[key] += 1
                self._undecided_vm[vm] = key

    def rule_of(self, vm):
        member = self.identity(vm)
        return member, self.rules.rule(*member)

    def decided(self, vm):
        """``vm`` was placed or dropped: where it stands now is final."""
        key = self._undecided_vm.pop(vm, None)
        if key is not None:
            self.undecided[key] -= 1

    def placed(self, vm, host):
        self.placed_here.setdefault(host, []).append(vm)
        if self.request.kind == "migrate" or vm in self.request.relocate:
            self.moved.add(vm)

    def _count(self, host, member, *, decided_only=False):
        usage = self.ledger.hosts.get(host)
        if usage is None:
            return 0
        undecided = self.undecided[(host, member)] if decided_only else 0
        return usage.clusters[member] - undecided

    def anchors(self, member):
        """-> the hosts where the cluster's decided, active VMs are."""
        return sorted(h for h in self.ledger.hosts
                      if self._count(h, member, decided_only=True) > 0)

    def _members_on(self, host, member):
        names = [n for n in sorted(self.state.clusters.get(member) or ())
                 if n not in self.moved and n in self.state.vms
                 and self.state.vms[n].get("lnm") == host
                 and self.state.vms[n]["state"] in ACTIVE_STATES]
        names += [n for n in self.placed_here.get(host, ()) if self.identity(n) == member]
        shown = [split(n, self.state.domain)[0] if split(n, self.state.domain) else n
                 for n in dict.fromkeys(names)]
        more = len(shown) - SHOWN_NAMES
        return ", ".join(shown[:SHOWN_NAMES]) + (f" and {more} more" if more > 0 else "")

    def refusal(self, vm, host):
        """Why ``vm`` may not go to ``host`` under its cluster's rule, or None."""
        member, rule = self.rule_of(vm)
        if rule == "apart":
            # VMs of the request still to move count where they are: one that
            # cannot move after all stays there.
            if self._count(host, member) > 0:
                return (f"runs {self._members_on(host, member) or 'a VM'} of cluster "
                        f"{member[1]}, kept apart ({describe(member, rule)})")
        elif rule == "together":
            anchors = self.anchors(member)
            if anchors and host not in anchors:
                source = (self.state.vms.get(vm) or {}).get("lnm")
                hint = ("; they are on this VM's own host: migrate the whole cluster in "
                        "one request" if source in anchors and self.request.kind == "migrate"
                        else "")
                return (f"the other VMs of cluster {member[1]} are on "
                        f"{', '.join(anchors)} ({describe(member, rule)}){hint}")
        return None

    def order(self, vm, hosts, demand_of):
        """``hosts`` (ranked) with, for the first VM of a ``together`` cluster
        that has none placed yet, those that can take every VM of it in this
        request first (else the first one would split the cluster)."""
        member, rule = self.rule_of(vm)
        if rule != "together" or self.anchors(member):
            return hosts
        group = [n for n in self.request.vms if self.identity(n) == member
                 and n not in self.request.placement]
        if len(group) < 2:
            return hosts
        demands = [demand_of(n) for n in group]
        fitting = [h for h in hosts if self._fits_all(h, demands)]
        return fitting + [h for h in hosts if h not in fitting]

    def _fits_all(self, host, demands):
        usage = self.ledger.hosts.get(host)
        if usage is None or not self.ledger.placeable(host):
            return False
        added = []
        try:
            for demand in demands:
                if usage.refusal(demand) is not None:
                    return False
                usage.add(demand)
                added.append(demand)
            return True
        finally:
            for demand in added:
                usage.add(demand, sign=-1)


def move_refusal(rules, ledger, record, target):
    """Why the rebalancer may not move ``record``'s VM to ``target`` (its
    ``ledger`` counts the VM on its source, and the moves it planned), or
    None. The rebalancer is always strict: a move is never needed."""
    if rules is None or not record.get("owner"):
        return None
    member = (record["owner"], record.get("cluster") or DEFAULT_CLUSTER)
    rule = rules.rule(*member)
    usage = ledger.hosts.get(target)
    if rule is None or usage is None:
        return None
    here = usage.clusters[member]
    if rule == "apart" and here > 0:
        return f"{target} runs another VM of cluster {member[1]} ({describe(member, rule)})"
    if rule == "together":
        others = sum(u.clusters[member] for u in ledger.hosts.values()) - 1
        if others > 0 and here != others:
            return (f"the other VMs of cluster {member[1]} are not all on {target} "
                    f"({describe(member, rule)})")
    return None

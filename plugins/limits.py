"""Limits: an authorization policy with quotas, per-role operations and
restricted queries.

For ordinary users (administrators too, unless ``admins_exempt``):

- VMs per user, VMs per virtual cluster, and memory and vCPUs per user
  (counting VMs that hold resources: running, paused, starting, migrating;
  per-user overrides in a ``[users]`` section); by default 100 VMs, 32 GiB
  and 128 vCPUs per user (``DEFAULT_QUOTAS``: the controller registers this
  plugin on ``start_request`` when ctrl.config has no [[plugins]]), 0 for
  no limit;
- the largest VM one may ask for (memory, vCPUs), and VMs per request;
- which requests only administrators may make (``admin_only``, e.g.
  ``migrate``), and which nobody may make (``denied``); ``destroy`` there
  covers ``delete`` too (before issue 17 destroy removed VMs);
- who may ask for guaranteed resources (``guaranteed=yes``);
- what ``list`` returns to ordinary users (``list_scope``: their own VMs,
  or the whole system's as with open authorization).

When a start asks for more VMs than the limits allow, the paper's "do the
best I can" policy (``on_excess = trim``, the default) starts as many as
are allowed and reports what it did: each VM left out is listed with the
limit it would break, and a note sums up. ``on_excess = reject`` refuses
the whole request instead.

Register on every request event (``start_request``, ``migrate_request``,
``list_request`` and the ``<operation>_request`` events), before placement;
sample configuration: ``etc/plugins/limits.config``.
"""

from collections import Counter

from usher import states
from usher.controller.capacity import ACTIVE_STATES, is_true
from usher.errors import ConfigError
from usher.naming import DEFAULT_CLUSTER, cluster_of, split

# The per-user quotas a site gets without saying (MiB of memory).
DEFAULT_QUOTAS = {"max_vms_per_user": 100, "max_memory_per_user": 32768,
                  "max_vcpus_per_user": 128}

CONFIG_SPEC = f"""
order = integer(default=20)
on_excess = option('trim', 'reject', default='trim')
admins_exempt = boolean(default=True)
max_vms_per_user = integer(min=0, default={DEFAULT_QUOTAS["max_vms_per_user"]})
max_vms_per_cluster = integer(min=0, default=0)
max_memory_per_user = integer(min=0, default={DEFAULT_QUOTAS["max_memory_per_user"]})
max_vcpus_per_user = integer(min=0, default={DEFAULT_QUOTAS["max_vcpus_per_user"]})
max_vms_per_request = integer(min=0, default=0)
max_memory_per_vm = integer(min=0, default=0)
max_vcpus_per_vm = integer(min=0, default=0)
admin_only = list(default=list('migrate'))
denied = list(default=list())
guarantees_for = option('everyone', 'admins', 'nobody', default='everyone')
list_scope = option('own', 'all', default='own')
[users]
[[__many__]]
max_vms_per_user = integer(min=0, default=None)
max_vms_per_cluster = integer(min=0, default=None)
max_memory_per_user = integer(min=0, default=None)
max_vcpus_per_user = integer(min=0, default=None)
"""
DEFAULT_ORDER = 20

REQUEST_KINDS = ("start", "migrate", "list") + states.OPERATIONS
# A request kind in admin_only/denied that covers others: sites that restricted
# destroy when it removed VMs keep delete, which now does, restricted.
KIND_ALIASES = {"destroy": ("delete",)}
QUOTAS = ("max_vms_per_user", "max_vms_per_cluster", "max_memory_per_user",
          "max_vcpus_per_user")


class Plugin:
    name = "limits"

    def __init__(self, config, api):
        self.api = api
        self.config = dict(config)
        for option in ("admin_only", "denied"):
            unknown = [k for k in config.get(option, ()) if k not in REQUEST_KINDS]
            if unknown:
                raise ConfigError(f"limits: {option}: unknown request kind(s) "
                                  f"{', '.join(map(repr, unknown))}; known: "
                                  f"{', '.join(REQUEST_KINDS)}")
        self.admin_only = _with_aliases(config.get("admin_only", ()))
        self.denied = _with_aliases(config.get("denied", ()))
        self.users = config.get("users") or {}

    def quota(self, user, option):
        """-> the limit for ``user`` (0: none): a [users] override, else the default."""
        value = (self.users.get(user) or {}).get(option)
        return self.config.get(option, 0) if value is None else value

    def exempt(self, request):
        return request.admin and self.config.get("admins_exempt", True)

    # -- the chain entry point -------------------------------------------------------

    def entry_point(self, event):
        request = event.request
        if request is None:
            return
        kind = request.kind
        if kind in self.denied:
            request.reject(f"{kind} requests are disabled by this site's policy")
            return
        if kind in self.admin_only and not request.admin:
            request.reject(f"only administrators may {kind} VMs")
            return
        if kind == "list":
            self._filter_list(request)
        elif kind == "start":
            self._check_start(request)

    def _filter_list(self, request):
        if request.admin or self.config.get("list_scope") == "all":
            return
        for vm in list(request.vms):
            if (request.records.get(vm) or {}).get("owner") != request.user:
                request.drop(vm, "not yours")

    # -- start: quotas ---------------------------------------------------------------

    def _check_start(self, request):
        if is_true(request.args.get("guaranteed")):
            allowed = self.config.get("guarantees_for", "everyone")
            if allowed == "nobody" or (allowed == "admins" and not request.admin):
                request.reject("guaranteed resources are not available to you "
                               f"(guarantees_for = {allowed})")
                return
        if self.exempt(request):
            return
        memory = int(request.args.get("memory_mib") or self.api.default_memory)
        vcpus = int(request.args.get("vcpus") or self.api.default_vcpus)
        for option, size, unit in (("max_memory_per_vm", memory, "MiB of memory"),
                                   ("max_vcpus_per_vm", vcpus, "vCPUs")):
            limit = self.config.get(option, 0)
            if limit and size > limit:
                request.reject(f"a VM may have at most {limit} {unit} (asked for {size})")
                return

        usage = _Usage(self.api.state)
        asked = len(request.vms)
        refused = {}
        per_request = self.config.get("max_vms_per_request", 0)
        accepted = 0
        for vm in list(request.vms):
            record = request.records.get(vm) or {}
            owner, cluster = self._identity(vm, record, request)
            restart = vm in self.api.state.vms
            need_memory = int(record.get("memory_mib") or memory)
            need_vcpus = int(record.get("vcpus") or vcpus)
            why = None
            if per_request and accepted >= per_request:
                why = f"at most {per_request} VMs per request"
            if why is None and not restart:
                why = self._count_limits(usage, owner, cluster)
            if why is None:
                why = self._size_limits(usage, owner, need_memory, need_vcpus)
            if why is not None:
                refused[vm] = why
                continue
            accepted += 1
            usage.add(owner, cluster, need_memory, need_vcpus, new=not restart)
        if not refused:
            return
        first = next(iter(refused.values()))
        if self.config.get("on_excess") == "reject":
            request.reject(f"the request exceeds your limits: {first} "
                           f"({len(refused)} of {asked} VMs over the limit)")
            return
        for vm, why in refused.items():
            request.drop(vm, f"over the limit: {why}")
        request.note(f"limits: {accepted} of {asked} VMs allowed; "
                     f"{len(refused)} left out ({first})")

    def _identity(self, vm, record, request):
        if record.get("owner"):
            return record["owner"], record.get("cluster") or DEFAULT_CLUSTER
        parts = split(vm, self.api.state.domain)
        if parts is None:
            return request.user, request.args.get("cluster") or DEFAULT_CLUSTER
        short, owner = parts
        return owner, request.args.get("cluster") or cluster_of(short)

    def _count_limits(self, usage, owner, cluster):
        limit = self.quota(owner, "max_vms_per_user")
        if limit and usage.vms[owner] + 1 > limit:
            return f"at most {limit} VMs per user ({owner} has {usage.vms[owner]})"
        limit = self.quota(owner, "max_vms_per_cluster")
        count = usage.cluster_vms[(owner, cluster)]
        if limit and count + 1 > limit:
            return f"at most {limit} VMs per virtual cluster ({cluster} has {count})"
        return None

    def _size_limits(self, usage, owner, memory, vcpus):
        limit = self.quota(owner, "max_memory_per_user")
        if limit and usage.memory[owner] + memory > limit:
            return (f"at most {limit} MiB of memory per user ({owner}'s running VMs use "
                    f"{usage.memory[owner]} MiB, this VM needs {memory} MiB)")
        limit = self.quota(owner, "max_vcpus_per_user")
        if limit and usage.vcpus[owner] + vcpus > limit:
            return (f"at most {limit} vCPUs per user ({owner}'s running VMs use "
                    f"{usage.vcpus[owner]}, this VM needs {vcpus})")
        return None


def _with_aliases(kinds):
    """-> the set of request kinds, with those KIND_ALIASES adds."""
    kinds = set(kinds)
    return kinds.union(*(KIND_ALIASES.get(k, ()) for k in kinds))


class _Usage:
    """What each user has now, updated as a request's VMs are accepted."""

    def __init__(self, state):
        self.vms = Counter()
        self.cluster_vms = Counter()
        self.memory = Counter()
        self.vcpus = Counter()
        for record in state.vms.values():
            owner = record.get("owner")
            self.vms[owner] += 1
            self.cluster_vms[(owner, record.get("cluster"))] += 1
            if record.get("state") in ACTIVE_STATES:
                self.memory[owner] += record.get("memory_mib") or 0
                self.vcpus[owner] += record.get("vcpus") or 0

    def add(self, owner, cluster, memory, vcpus, *, new):
        if new:
            self.vms[owner] += 1
            self.cluster_vms[(owner, cluster)] += 1
        self.memory[owner] += memory
        self.vcpus[owner] += vcpus

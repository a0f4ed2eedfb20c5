"""Least-loaded placement: new VMs go to the hosts that are least busy.

Uses the monitoring figures the LNMs report (the host's CPU utilisation
averaged over 1, 5 or 15 minutes, read through
``usher.controller.capacity.host_load``; figures older than ``max_age``
seconds do not count). VMs placed by the same request
count as ``vm_load`` of a CPU each, so ten VMs started at once do not all
land on the one idle host. Hosts at or above ``max_load`` are refused. A host
whose LNM reports no load figures is tried after the others, by allocated
capacity (``without_data = last``), or refused with the reason "no load
data" (``without_data = refuse``). Capacity, overcommit, reservations and
guarantees as in ``usher.controller.capacity``.

Register on ``start_request`` and ``migrate_request``; sample configuration:
``etc/plugins/leastloaded.config``.
"""

from collections import Counter

from usher.controller.capacity import host_load
from usher.controller.placement import PLACEMENT_SPEC, PlacementPlugin

CONFIG_SPEC = """
order = integer(default=50)
window = option('1', '5', '15', default='1')
max_load = float(min=0, default=None)
without_data = option('last', 'refuse', default='last')
vm_load = float(min=0, default=1.0)
max_age = float(gt=0, default=120)
""" + PLACEMENT_SPEC
DEFAULT_ORDER = 50


class Plugin(PlacementPlugin):
    name = "leastloaded"
    policy = "least-loaded"

    def __init__(self, config, api):
        super().__init__(config, api)
        self.window = int(config.get("window") or 1)
        self.max_load = config.get("max_load")
        self.without_data = config.get("without_data") or "last"
        self.vm_load = config.get("vm_load", 1.0)
        self.max_age = config.get("max_age", 120)
        self._loads = {}
        self._added = Counter()
        self._blind = set()

    def begin(self, request, ledger):
        self._loads = {host: host_load(self.api, host, self.window, self.max_age)
                       for host in ledger.hosts}
        self._added = Counter()
        self._blind = set()

    def projected(self, host, ledger):
        load = self._loads.get(host)
        if load is None:
            return None
        cpus = ledger.hosts[host].cpus or 1
        return load + self._added[host] * self.vm_load / cpus

    def rank(self, vm, demand, candidates, ledger, request):
        def key(host):
            load = self.projected(host, ledger)
            return ((1, 0.0) if load is None else (0, load)) + (ledger.hosts[host].fill(), host)
        return sorted(candidates, key=key)

    def refuse(self, vm, host, demand, ledger, request):
        load = self.projected(host, ledger)
        if load is None:
            if self.without_data == "refuse":
                return (f"no load data (no recent {self.window}-minute CPU average "
                        "from its LNM)")
            return None
        if self.max_load is not None and load >= self.max_load:
            return (f"load {load:.2f} is at or above the limit {self.max_load:.2f} "
                    f"({self.window}-minute CPU average)")
        return None

    def placed(self, vm, host, demand, ledger, request):
        self._added[host] += demand.vcpus
        if self._loads.get(host) is None and host not in self._blind:
            self._blind.add(host)
            request.note(f"least-loaded: no load data from {host}; VMs placed there by "
                         "allocated capacity")

"""Spread placement: the VMs of one virtual cluster on separate hosts.

The paper's "distribution": a new VM goes to the host running the fewest
VMs of its virtual cluster (then the emptiest host), so that one host's
failure takes as few of a cluster's VMs as possible. With ``strict = yes`` a
host that already runs a VM of the cluster is refused, and VMs beyond the
number of hosts are not started (each with the reason); otherwise they
double up as evenly as possible and the result says so. Capacity,
overcommit, reservations and guarantees as in ``usher.controller.capacity``.

Register on ``start_request`` and ``migrate_request``; sample configuration:
``etc/plugins/spread.config``.
"""

from usher.controller.placement import PLACEMENT_SPEC, PlacementPlugin

CONFIG_SPEC = """
order = integer(default=50)
strict = boolean(default=False)
""" + PLACEMENT_SPEC
DEFAULT_ORDER = 50


class Plugin(PlacementPlugin):
    name = "spread"
    policy = "spread"

    def __init__(self, config, api):
        super().__init__(config, api)
        self.strict = bool(config.get("strict", False))
        self._doubled = set()

    def begin(self, request, ledger):
        self._doubled = set()

    def rank(self, vm, demand, candidates, ledger, request):
        member = self.vm_identity(vm, request)
        return sorted(candidates,
                      key=lambda host: (ledger.hosts[host].clusters[member],
                                        ledger.hosts[host].fill(), host))

    def refuse(self, vm, host, demand, ledger, request):
        if not self.strict:
            return None
        member = self.vm_identity(vm, request)
        sharing = ledger.hosts[host].clusters[member]
        if sharing:
            return (f"already runs {sharing} VM{'s' if sharing > 1 else ''} of virtual "
                    f"cluster {member[1]} (spread is strict)")
        return None

    def placed(self, vm, host, demand, ledger, request):
        member = self.vm_identity(vm, request)
        if ledger.hosts[host].clusters[member] > 1 and member not in self._doubled:
            self._doubled.add(member)
            request.note(f"spread: cluster {member[1]} has more VMs than hosts with room; "
                         "some VMs share a host")

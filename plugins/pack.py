"""Pack placement: consolidate VMs onto the fewest active hosts (power saving).

A new VM goes to the fullest host that still has room among those already
running VMs (best fit); an idle host is used only when no active host can
take it, and then the largest idle host first, so that idle hosts stay idle
and can be powered down. Capacity, overcommit, reservations and guarantees
as in ``usher.controller.capacity``; every refusal names each LNM's problem.

Register on ``start_request`` and ``migrate_request`` (a migration then
moves the VM onto the fullest other host with room); sample configuration:
``etc/plugins/pack.config``.
"""

from usher.controller.placement import PLACEMENT_SPEC, PlacementPlugin

CONFIG_SPEC = """
order = integer(default=50)
""" + PLACEMENT_SPEC
DEFAULT_ORDER = 50


class Plugin(PlacementPlugin):
    name = "pack"
    policy = "pack"

    def rank(self, vm, demand, candidates, ledger, request):
        def key(host):
            usage = ledger.hosts[host]
            active = usage.vms > 0
            # Active hosts, fullest first; then idle hosts, largest first.
            return (0, -usage.fill(), host) if active else (
                1, -usage.usable_memory, -usage.usable_cpus, host)
        return sorted(candidates, key=key)

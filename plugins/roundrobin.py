"""Round-robin placement: new VMs go to the connected LNMs in turn.

The paper's default placement. Hosts without room (CPU and memory, with the
overcommit ratios, host reservations and VM guarantees of
``usher.controller.capacity``) are skipped; a VM that fits nowhere is
dropped from the request with a reason naming each LNM's problem. Also
chooses migration targets (in turn, among the hosts with room).

Register on ``start_request`` and ``migrate_request``, after authorization;
sample configuration: ``etc/plugins/roundrobin.config``.
"""

import bisect

from usher.controller.placement import PLACEMENT_SPEC, PlacementPlugin

CONFIG_SPEC = """
order = integer(default=50)
""" + PLACEMENT_SPEC
DEFAULT_ORDER = 50


class Plugin(PlacementPlugin):
    name = "roundrobin"
    policy = "round-robin"

    def __init__(self, config, api):
        super().__init__(config, api)
        self._last = None   # the host that got the previous VM
        # The last candidates seen and their sorted order: a start of 5,000
        # VMs on 2,000 hosts ranks the same candidates 5,000 times, and
        # sorting and splitting them in Python each time held the reactor
        # for seconds.
        self._ranked_candidates = None
        self._ordered = []

    def rank(self, vm, demand, candidates, ledger, request):
        candidates = tuple(candidates)
        if candidates != self._ranked_candidates:
            self._ranked_candidates, self._ordered = candidates, sorted(candidates)
        ordered = self._ordered
        if self._last is None:
            return list(ordered)
        # Start after the host that got the previous VM, by name, so that
        # hosts joining or leaving do not reset the rotation.
        cut = bisect.bisect_right(ordered, self._last)
        return ordered[cut:] + ordered[:cut]

    def placed(self, vm, host, demand, ledger, request):
        self._last = host

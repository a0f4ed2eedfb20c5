"""Open authorization: every authenticated user may create and manipulate
their own VMs and see the global state (the paper's simplest policy).

Ownership is enforced by the controller itself; this plugin only records
the decision so administrators can see, in the chain, that a policy ran.
"""

from twisted.logger import Logger

CONFIG_SPEC = """
order = integer(default=10)
"""
DEFAULT_ORDER = 10

log = Logger()


class Plugin:
    name = "open_authz"

    def __init__(self, config, api):
        pass

    def entry_point(self, event):
        request = event.request
        if request is not None:
            log.debug("open_authz approves {kind} by {user} for {count} VMs",
                      kind=request.kind, user=request.user, count=len(request.vms))

"""What plusher's callers see that never changes: the XML-RPC fault codes
(and which Usher error becomes which), the request states and up-call
outcomes ``status`` reports, and XML-RPC's lack of nil."""

from collections.abc import Mapping

from usher.errors import (AuthenticationFailed, ConfigError, InvalidRequest, NoSuchLNM,
                          NoSuchVM, PermissionDenied, Rejected, Unavailable, UsherError)

# Fault codes: part of plusher's interface, never renumbered.
FAULT_AUTHENTICATION = 1    # wrong user name or password; unknown or expired session
FAULT_INVALID_REQUEST = 2   # a malformed or missing argument
FAULT_NO_SUCH_VM = 3        # a named VM does not exist (or is not the user's to see)
FAULT_PERMISSION = 4        # the user may not do this (another user's VM or request)
FAULT_UNAVAILABLE = 5       # the controller cannot be reached, or plusher is full
FAULT_REJECTED = 6          # a controller plugin refused the request
FAULT_FAILED = 7            # the controller or a host could not carry it out
FAULT_NO_SUCH_REQUEST = 8   # unknown (or forgotten) request id
FAULT_INTERNAL = 9          # a bug in plusher; its log has the details

# Request states as status() reports them.
STARTING = "starting"   # the start request is at the controller
WAITING = "waiting"     # started; waiting for every VM to run
READY = "ready"         # resources_ready sent (or being sent)
FAILED = "failed"       # resources_failed sent (or being sent)
RELEASED = "released"   # Plush released it; no up-call follows

# Up-call outcomes as status() reports them.
UPCALL_NONE, UPCALL_PENDING, UPCALL_DELIVERED = "none", "pending", "delivered"
UPCALL_REFUSED, UPCALL_GAVE_UP, UPCALL_CANCELLED = "refused", "gave_up", "cancelled"


class NoSuchRequest(UsherError):
    """The request id is unknown, or finished longer than request_retention ago."""


def fault_code(error):
    """The fault code of an UsherError."""
    for cls, code in ((AuthenticationFailed, FAULT_AUTHENTICATION),
                      (NoSuchVM, FAULT_NO_SUCH_VM), (PermissionDenied, FAULT_PERMISSION),
                      (Unavailable, FAULT_UNAVAILABLE), (Rejected, FAULT_REJECTED),
                      (NoSuchRequest, FAULT_NO_SUCH_REQUEST),
                      (InvalidRequest, FAULT_INVALID_REQUEST),
                      (NoSuchLNM, FAULT_INVALID_REQUEST), (ConfigError, FAULT_UNAVAILABLE)):
        if isinstance(error, cls):
            return code
    return FAULT_FAILED


def strip_none(value):
    """XML-RPC has no nil: drop None fields, recursively."""
    if isinstance(value, Mapping):
        return {str(k): strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [strip_none(v) for v in value if v is not None]
    return value

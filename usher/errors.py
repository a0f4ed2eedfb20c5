"""Errors that cross Usher's boundaries.

They subclass ``pb.Error`` so Perspective Broker sends the message (and the
class name, see ``remote_type``) to the caller without a traceback. The client
library turns the remote type name back into the same class with
``from_remote``.
"""

from twisted.spread import pb


# -- Exit statuses (ush, and the ``usher`` admin tool where they apply) -------
# One table, rendered into ``ush help exit-codes`` and the README.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_NO_MATCH = 4
EXIT_INTERRUPTED = 130

EXIT_STATUSES = (
    (EXIT_OK, "success",
     "success, including VMs already in the state asked for (reported as already)"),
    (EXIT_FAILED, "failed",
     "the command failed or was refused, for some VMs or all (a plugin, permissions, "
     "a VM in the wrong state, no capacity, the hypervisor); 3 instead when one of "
     "them failed with a code of status 3"),
    (EXIT_USAGE, "usage or configuration",
     "usage or bad input: an unknown command or option, a malformed name, range or "
     "regular expression, an invalid configuration or a missing file it names (the "
     "CA certificate, password_file)"),
    (EXIT_CONNECTION, "connection or outcome unknown",
     "cannot connect or log in (no password), the connection was lost, or, for "
     "some VM, its LNM cannot be reached (unavailable) or the outcome is unknown (a "
     "command went out and no answer came)"),
    (EXIT_NO_MATCH, "nothing matched",
     "nothing matched: an unknown VM or LNM, or VMs asked for by name, -n, -r or "
     "--lnm that match none (list prints 0 VMs.; list with no selection exits 0)"),
    (EXIT_INTERRUPTED, "interrupted", "interrupted (Ctrl-C)"),
)

# -- Machine-readable error codes ------------------------------------------------
# Stable: ush --json errors ({"error", "code"}), every failed VM of a result
# ({"name", "error", "code"}) and usherweb's error bodies carry them.
# code -> (exit status, meaning).
INVALID_REQUEST = "invalid_request"
CONFIG_ERROR = "config_error"
USAGE = "usage"
NO_SUCH_VM = "no_such_vm"
NO_SUCH_LNM = "no_such_lnm"
PERMISSION_DENIED = "permission_denied"
AUTHENTICATION_FAILED = "authentication_failed"
NO_PASSWORD = "no_password"
REJECTED = "rejected"
WRONG_STATE = "wrong_state"
BUSY = "busy"
NO_CAPACITY = "no_capacity"
OPERATION_FAILED = "operation_failed"
UNAVAILABLE = "unavailable"
OUTCOME_UNKNOWN = "outcome_unknown"
STANDBY = "standby"
STALE_TERM = "stale_term"
INTERNAL = "internal"

ERROR_CODES = {
    USAGE: (EXIT_USAGE, "a command line ush cannot parse or check (unknown command "
                        "or option, a missing argument)"),
    INVALID_REQUEST: (EXIT_USAGE, "malformed input: a name, range, regular expression "
                                  "or argument"),
    CONFIG_ERROR: (EXIT_USAGE, "invalid configuration, or a file it names is missing "
                               "(the message names the file, line and key)"),
    NO_SUCH_VM: (EXIT_NO_MATCH, "no such VM, or no VM matches the selection"),
    NO_SUCH_LNM: (EXIT_NO_MATCH, "no such LNM"),
    PERMISSION_DENIED: (EXIT_FAILED, "not your VM, or a command for administrators"),
    REJECTED: (EXIT_FAILED, "a plugin refused the request (the message is its reason)"),
    WRONG_STATE: (EXIT_FAILED, "the VM's state does not allow the operation (e.g. "
                               "resume a shut-off VM)"),
    BUSY: (EXIT_FAILED, "another command on the VM is in progress"),
    NO_CAPACITY: (EXIT_FAILED, "no LNM can take the VM"),
    OPERATION_FAILED: (EXIT_FAILED, "the hypervisor or an LNM could not carry it out"),
    INTERNAL: (EXIT_FAILED, "an unexpected error (see the controller's log)"),
    AUTHENTICATION_FAILED: (EXIT_CONNECTION, "wrong user name or password"),
    NO_PASSWORD: (EXIT_CONNECTION, "no password configured and none could be asked "
                                   "for (no terminal)"),
    UNAVAILABLE: (EXIT_CONNECTION, "the controller or the VM's LNM cannot be reached; "
                                   "nothing was done"),
    OUTCOME_UNKNOWN: (EXIT_CONNECTION, "the command was sent and no answer came: it "
                                       "may or may not have happened"),
    STANDBY: (EXIT_CONNECTION, "a standby controller (high availability): the active one "
                               "serves; clients and LNMs try the next configured controller"),
    STALE_TERM: (EXIT_FAILED, "an LNM refused a controller whose term of leadership is "
                              "older than one it has seen (a deposed active controller)"),
}


def exit_status_of_code(code):
    """The exit status an error ``code`` comes to (EXIT_FAILED for one not
    in the table)."""
    return ERROR_CODES.get(code, (EXIT_FAILED, ""))[0]


class UsherError(pb.Error):
    """Base of every error a user or administrator may see."""

    code = INTERNAL

    def __str__(self):
        return self.args[0] if self.args else self.__class__.__name__


class InvalidRequest(UsherError):
    """Malformed names, regular expressions, ranges, operations or arguments."""

    code = INVALID_REQUEST


class NoSuchVM(UsherError):
    """The VM is not known (or not visible to this user)."""

    code = NO_SUCH_VM


class NoSuchLNM(UsherError):
    """The LNM is not connected to the controller."""

    code = NO_SUCH_LNM


class PermissionDenied(UsherError):
    """The user may not act on this VM or call this method."""

    code = PERMISSION_DENIED


class AuthenticationFailed(UsherError):
    """Wrong password, unknown user or no module accepted the credentials."""

    code = AUTHENTICATION_FAILED


class Rejected(UsherError):
    """A plugin rejected the request; the message is the plugin's reason."""

    code = REJECTED


class OperationFailed(UsherError):
    """The hypervisor or an LNM could not carry out a command."""

    code = OPERATION_FAILED


class MigrationUnsupported(UsherError):
    """The VMM driver cannot live-migrate; the controller falls back to save/restore."""


class Unavailable(UsherError):
    """The controller or LNM is not reachable, or the call timed out."""

    code = UNAVAILABLE


class LinkFailure(Unavailable):
    """The link failed under a call. ``sent`` is False when the request never
    left (the peer had disconnected): nothing happened. When True the peer may
    or may not have carried it out (the connection dropped or the answer did
    not come in time): its outcome is unknown."""

    def __init__(self, message, sent=True):
        super().__init__(message)
        self.sent = sent

    @property
    def code(self):
        return OUTCOME_UNKNOWN if self.sent else UNAVAILABLE


class Standby(UsherError):
    """A standby controller (high availability): it serves nothing that
    commands; the message names the active one when it knows it."""

    code = STANDBY


class StaleTerm(UsherError):
    """An LNM refused a command from a controller whose term of leadership
    is lower than the highest it has seen (usher.protocol, High
    availability): nothing was done."""

    code = STALE_TERM


class ConfigError(UsherError):
    """Invalid configuration; the message names the file, line and key."""

    code = CONFIG_ERROR


_BY_NAME = {cls.__name__: cls for cls in (
    UsherError, InvalidRequest, NoSuchVM, NoSuchLNM, PermissionDenied,
    AuthenticationFailed, Rejected, OperationFailed, MigrationUnsupported,
    Unavailable, LinkFailure, Standby, StaleTerm, ConfigError)}


def from_name(kind, message):
    """The UsherError class named ``kind`` (UsherError itself for a name it
    does not know) with ``message``: errors sent inside data, not as PB
    failures (e.g. one per VM of a batch)."""
    cls = _BY_NAME.get(kind if isinstance(kind, str) else "", UsherError)
    return cls(str(message))


def from_failure(failure):
    """Return an UsherError for a Failure that came over PB (or locally)."""
    if isinstance(failure.value, UsherError):
        return failure.value
    remote_type = failure.type
    if isinstance(remote_type, bytes):
        remote_type = remote_type.decode("utf-8", "replace")
    if isinstance(remote_type, str):
        cls = _BY_NAME.get(remote_type.rsplit(".", 1)[-1], UsherError)
        value = failure.value
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return cls(str(value))
    return UsherError(f"{failure.type.__name__}: {failure.getErrorMessage()}")

"""Errors that cross Usher's boundaries.

They subclass ``pb.Error`` so Perspective Broker sends the message (and the
class name, see ``remote_type``) to the caller without a traceback. The client
library turns the remote type name back into the same class with
``from_remote``.
"""

from twisted.spread import pb


class UsherError(pb.Error):
    """Base of every error a user or administrator may see."""

    def __str__(self):
        return self.args[0] if self.args else self.__class__.__name__


class InvalidRequest(UsherError):
    """Malformed names, regular expressions, ranges, operations or arguments."""


class NoSuchVM(UsherError):
    """The VM is not known (or not visible to this user)."""


class NoSuchLNM(UsherError):
    """The LNM is not connected to the controller."""


class PermissionDenied(UsherError):
    """The user may not act on this VM or call this method."""


class AuthenticationFailed(UsherError):
    """Wrong password, unknown user or no module accepted the credentials."""


class Rejected(UsherError):
    """A plugin rejected the request; the message is the plugin's reason."""


class OperationFailed(UsherError):
    """The hypervisor or an LNM could not carry out a command."""


class MigrationUnsupported(UsherError):
    """The VMM driver cannot live-migrate; the controller falls back to save/restore."""


class Unavailable(UsherError):
    """The controller or LNM is not reachable, or the call timed out."""


class LinkFailure(Unavailable):
    """The link failed under a call. ``sent`` is False when the request never
    left (the peer had disconnected): nothing happened. When True the peer may
    or may not have carried it out (the connection dropped or the answer did
    not come in time): its outcome is unknown."""

    def __init__(self, message, sent=True):
        super().__init__(message)
        self.sent = sent


class ConfigError(UsherError):
    """Invalid configuration; the message names the file, line and key."""


_BY_NAME = {cls.__name__: cls for cls in (
    UsherError, InvalidRequest, NoSuchVM, NoSuchLNM, PermissionDenied,
    AuthenticationFailed, Rejected, OperationFailed, MigrationUnsupported,
    Unavailable, LinkFailure, ConfigError)}


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

"""Helpers at the Perspective Broker boundary."""

import functools

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.spread import pb
from twisted.spread.banana import BananaError

from usher.errors import InvalidRequest, LinkFailure, from_failure


def call(remote, method, *args, timeout, clock, **kwargs):
    """``remote.callRemote`` with a timeout; failures become UsherErrors.

    PB never fires a caller's Deferred whose reply banana refused, and a
    silent peer never answers: the timeout turns both into ``Unavailable``
    (a ``LinkFailure``: its ``sent`` says whether the peer may have acted).
    """
    try:
        d = remote.callRemote(method, *args, **kwargs)
    except pb.DeadReferenceError:
        return defer.fail(LinkFailure(f"{method}: peer disconnected", sent=False))
    except BananaError as e:
        # Raised before anything is sent (e.g. a string over 640 KiB).
        return defer.fail(InvalidRequest(f"{method}: request cannot be sent: {e}"))
    d.addTimeout(timeout, clock)

    def translate(failure):
        if failure.check(defer.TimeoutError, defer.CancelledError):
            raise LinkFailure(f"{method}: no answer within {timeout:g} s")
        if failure.check(pb.DeadReferenceError):
            raise LinkFailure(f"{method}: peer disconnected", sent=False)
        if failure.check(pb.PBConnectionLost, ConnectionLost, ConnectionDone):
            raise LinkFailure(f"{method}: connection lost")
        raise from_failure(failure)

    return d.addErrback(translate)


def tell(remote, method, *args):
    """``method`` sent to ``remote`` as a one-way message (PB's ``pbanswer``
    off): the peer sends no answer, so there is nothing to time out, and no
    Deferred or timer per message (the controller's pushes to clients, many
    per second). -> None; InvalidRequest if it cannot be serialised, and
    LinkFailure (not sent) if the peer is gone."""
    try:
        d = remote.callRemote(method, *args, pbanswer=False)
    except pb.DeadReferenceError:
        raise LinkFailure(f"{method}: peer disconnected", sent=False) from None
    except BananaError as e:
        raise InvalidRequest(f"{method}: message cannot be sent: {e}") from None
    if d is not None:
        # What PB gives for a message it could not serialise: a failed Deferred.
        failures = []
        d.addErrback(failures.append)
        if failures:
            raise InvalidRequest(f"{method}: message cannot be sent: "
                                 f"{failures[0].getErrorMessage()}")
    return None


def as_deferred(coroutine_function):
    """Decorate an ``async def`` so that its callers get a Deferred: PB's
    remote_/perspective_ methods (PB does not await coroutines), and the
    Deferred APIs of the client library and plusher's gateway."""

    @functools.wraps(coroutine_function)
    def wrapper(*args, **kwargs):
        return defer.Deferred.fromCoroutine(coroutine_function(*args, **kwargs))

    return wrapper

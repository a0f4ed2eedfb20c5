"""Errors as the REST API answers them: ``{"error": {"code", "message"}}``
with an HTTP status and a code that never changes (WEB_SPEC, Errors). The
message of an Usher error is the one ush prints (clients/ush/outcome.py)."""

from usher.clients.ush.outcome import error_outcome
from usher.errors import (AuthenticationFailed, InvalidRequest, LinkFailure,
                          MigrationUnsupported, NoSuchLNM, NoSuchVM, OperationFailed,
                          PermissionDenied, Rejected, Unavailable)

INVALID_REQUEST = "invalid_request"
AUTHENTICATION_FAILED = "authentication_failed"
NOT_LOGGED_IN = "not_logged_in"
CSRF_FAILED = "csrf_failed"
PERMISSION_DENIED = "permission_denied"
NO_SUCH_VM = "no_such_vm"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
REJECTED = "rejected"
OPERATION_FAILED = "operation_failed"
TOO_LARGE = "too_large"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
INTERNAL = "internal"
UNAVAILABLE = "unavailable"
OUTCOME_UNKNOWN = "outcome_unknown"

# code -> HTTP status (the OpenAPI document lists them from here).
STATUSES = {
    INVALID_REQUEST: 400, AUTHENTICATION_FAILED: 401, NOT_LOGGED_IN: 401, CSRF_FAILED: 403,
    PERMISSION_DENIED: 403, NO_SUCH_VM: 404, NOT_FOUND: 404, METHOD_NOT_ALLOWED: 405,
    REJECTED: 409, OPERATION_FAILED: 409, TOO_LARGE: 413, UNSUPPORTED_MEDIA_TYPE: 415,
    INTERNAL: 500, UNAVAILABLE: 503, OUTCOME_UNKNOWN: 504,
}

# Most specific first: LinkFailure is an Unavailable, NoSuchLNM is no VM.
_CODES = (
    (InvalidRequest, INVALID_REQUEST), (AuthenticationFailed, AUTHENTICATION_FAILED),
    (PermissionDenied, PERMISSION_DENIED), (NoSuchVM, NO_SUCH_VM), (NoSuchLNM, NOT_FOUND),
    (Rejected, REJECTED), (OperationFailed, OPERATION_FAILED),
    (MigrationUnsupported, OPERATION_FAILED), (Unavailable, UNAVAILABLE),
)


class ApiError(Exception):
    """An error of the web layer itself (no session, a bad CSRF token, a
    body that is not JSON ...): a code from STATUSES and a message."""

    def __init__(self, code, message, headers=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}

    @property
    def status(self):
        return STATUSES[self.code]


def code_of(error):
    """The stable code of an UsherError."""
    if isinstance(error, LinkFailure):
        return OUTCOME_UNKNOWN if error.sent else UNAVAILABLE
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return INTERNAL


def from_usher_error(error):
    """An UsherError as the API answers it, with ush's message."""
    return ApiError(code_of(error), error_outcome(error).data["error"])


def body(code, message):
    return {"error": {"code": code, "message": message}}

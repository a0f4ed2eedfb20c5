"""Errors as the REST API answers them: ``{"error": {"code", "message"}}``
with an HTTP status and a code that never changes (WEB_SPEC, Errors): for
Usher's errors the codes of ``usher.errors.ERROR_CODES``, which ush --json
prints too. The message of an Usher error is the one ush prints
(clients/ush/outcome.py)."""

from usher import errors
from usher.clients.ush.outcome import error_outcome

# The codes of Usher's errors are usher.errors.ERROR_CODES (ush --json uses
# the same); these are the web layer's own.
INVALID_REQUEST = errors.INVALID_REQUEST
AUTHENTICATION_FAILED = errors.AUTHENTICATION_FAILED
NOT_LOGGED_IN = "not_logged_in"
CSRF_FAILED = "csrf_failed"
PERMISSION_DENIED = errors.PERMISSION_DENIED
NO_SUCH_VM = errors.NO_SUCH_VM
NO_SUCH_LNM = errors.NO_SUCH_LNM
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
REJECTED = errors.REJECTED
OPERATION_FAILED = errors.OPERATION_FAILED
TOO_LARGE = "too_large"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
INTERNAL = errors.INTERNAL
UNAVAILABLE = errors.UNAVAILABLE
OUTCOME_UNKNOWN = errors.OUTCOME_UNKNOWN
# Every controller listed is a standby (high availability): try again.
STANDBY = errors.STANDBY

# code -> HTTP status (the OpenAPI document lists them from here).
STATUSES = {
    INVALID_REQUEST: 400, AUTHENTICATION_FAILED: 401, NOT_LOGGED_IN: 401, CSRF_FAILED: 403,
    PERMISSION_DENIED: 403, NO_SUCH_VM: 404, NO_SUCH_LNM: 404, NOT_FOUND: 404,
    METHOD_NOT_ALLOWED: 405, REJECTED: 409, OPERATION_FAILED: 409, TOO_LARGE: 413,
    UNSUPPORTED_MEDIA_TYPE: 415, INTERNAL: 500, UNAVAILABLE: 503, STANDBY: 503,
    OUTCOME_UNKNOWN: 504,
}


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
    """The stable code of an UsherError (usher.errors.ERROR_CODES)."""
    code = getattr(error, "code", INTERNAL)
    return code if code in STATUSES else INTERNAL


def from_usher_error(error):
    """An UsherError as the API answers it, with ush's message."""
    return ApiError(code_of(error), error_outcome(error).data["error"])


def body(code, message):
    return {"error": {"code": code, "message": message}}

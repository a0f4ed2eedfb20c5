"""What the controller's commands on VMs share (``starting``,
``operations``, ``migration``): the checks of a request's extra arguments,
the copy of a record an LNM is sent, the per-VM preconditions, the text of a
failed command, the per-LNM slots, and the guard that accounts for every VM
a command was given.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher import errors
from usher.errors import InvalidRequest, LinkFailure, NoSuchVM
from usher.naming import check_label

log = Logger()

# What an LNM is sent of a VM record (receive, acknowledgments): what it needs
# to run the VM, nothing else.
LNM_FIELDS = ("name", "owner", "cluster", "state", "lnm", "memory_mib", "vcpus", "uuid",
              "version", "args", "plugin_args")


def lnm_view(record):
    """The copy of a record an LNM is sent."""
    return {key: record[key] for key in LNM_FIELDS if key in record}


# Keys a request's extra arguments may not shadow.
RESERVED_ARGS = {"memory_mib", "vcpus", "cluster", "count"}
# A request's extra arguments are copied into every VM's record, to plugins,
# LNMs and clients: at most MAX_ARGS of them, each value at most MAX_ARG_LEN
# characters, names and values together at most MAX_ARGS_BYTES (UTF-8).
MAX_ARG_LEN = 4096
MAX_ARGS = 32
MAX_ARGS_BYTES = 16384


def check_args(args):
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise InvalidRequest("request arguments must be a dict")
    if len(args) > MAX_ARGS:
        raise InvalidRequest(f"at most {MAX_ARGS} request arguments (got {len(args)})")
    clean = {}
    size = 0
    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier() or len(key) > 64:
            raise InvalidRequest(f"invalid argument name {key[:64]!r}"
                                 if isinstance(key, str) else "invalid argument name")
        if isinstance(value, bool) or value is None:
            clean[key] = value
        elif isinstance(value, (int, float)):
            clean[key] = value
        elif isinstance(value, str) and len(value) <= MAX_ARG_LEN:
            clean[key] = value
            size += len(value.encode("utf-8", "surrogatepass"))
        else:
            raise InvalidRequest(f"argument {key!r} must be a short string or a number")
        size += len(key)
        if size > MAX_ARGS_BYTES:
            raise InvalidRequest(f"request arguments are larger than {MAX_ARGS_BYTES} "
                                 "bytes in all")
    for key in ("memory_mib", "vcpus", "count"):
        if key in clean and (not isinstance(clean[key], int) or isinstance(clean[key], bool)
                             or clean[key] < 1):
            raise InvalidRequest(f"argument {key!r} must be a positive integer")
    if "cluster" in clean:
        if not isinstance(clean["cluster"], str):
            raise InvalidRequest("cluster must be a string")
        check_label(clean["cluster"], "cluster name")
    return clean


def plugin_set_args(user_args, args, vm_args):
    """The names of a new VM's ``args`` that plugins set rather than the
    user's request (its record's ``plugin_args``, which the LNM's
    ``plugin_args`` option applies to instead of ``request_args``): those of
    ``vm_args`` (``Request.set_vm_arg``) and those whose value is not the one
    the user sent. A value the user sent and no plugin changed stays the
    user's, whatever plugins saw it."""
    return sorted(key for key, value in args.items()
                  if key in vm_args or key not in user_args
                  or not (user_args[key] is value or user_args[key] == value))


class Reason(str):
    """Why a command may not go to a VM, with its code (usher.errors.ERROR_CODES)."""

    def __new__(cls, text, code):
        reason = super().__new__(cls, text)
        reason.code = code
        return reason


def failed_entry(name, error, code=None):
    """A failed VM of a result: {"name", "error", "code"}. ``error`` is an
    UsherError (its code), a Reason, or text with ``code`` (default
    operation_failed)."""
    if code is None:
        code = getattr(error, "code", errors.OPERATION_FAILED)
    return {"name": name, "error": str(error), "code": code}


def dropped_failures(request):
    """The failed entries of the VMs plugins dropped from ``request``."""
    codes = getattr(request, "dropped_codes", {})
    return [failed_entry(n, why, codes.get(n, errors.REJECTED))
            for n, why in request.dropped.items()]


def unanswered(error):
    """Was the command sent, its answer never came (its outcome unknown)?"""
    return isinstance(error, LinkFailure) and error.sent


def failure_text(error, lnm, name, before):
    """What a client is told of a command on ``name`` that failed with
    ``error``: a link that failed before it was sent (``before``: "pause
    could be sent", "x could be started") did nothing; one that failed after
    leaves the outcome unknown."""
    if unanswered(error):
        return f"{error}: the outcome is unknown; {name} is lost until LNM {lnm} reports back"
    if isinstance(error, LinkFailure):
        return f"LNM {lnm} disconnected before {before}; nothing was done"
    return str(error)


def unexpected(error):
    """An error no one expected, under a command whose answer is lost with
    it: its outcome is unknown (a link failure after sending)."""
    return LinkFailure(f"internal error: {error.__class__.__name__}: {error}")


async def run_each(works, what, **fields):
    """Run ``works`` (coroutines) together; one that raises is logged with
    its traceback (``what``, ``fields``: the log line) and the others go on."""
    results = await defer.DeferredList([defer.Deferred.fromCoroutine(w) for w in works],
                                       consumeErrors=True)
    for ok, result in results:
        if not ok:
            log.failure("{what} failed unexpectedly", failure=result, what=what, **fields)


def unaccounted(names, *answered):
    """The names of ``names`` in none of the ``answered`` lists of entries."""
    seen = {entry["name"] for entries in answered for entry in entries}
    return [name for name in names if name not in seen]


async def hard_off(handle, name):
    """Power ``name`` off hard on the LNM of ``handle`` (its destroy), the
    first step of removing a VM that may run -> its domain info; None if
    that left nothing to delete (a transient domain, or an LNM before issue
    17, whose destroy also undefined); {} if the LNM did not have it running
    (gone, or off already: the delete that follows decides)."""
    try:
        return await handle.op_on("destroy", name)
    except (NoSuchVM, InvalidRequest):
        return {}


INTERNAL_ERROR = "internal error in the controller (see its log); nothing more is known"


class Room:
    """What each room of commands (start, operations, migration) works
    with: the global state, the plugin chains and their API, the in-flight
    ledger, the LNM inventory and who sees which VMs."""

    def __init__(self, *, state, chains, api, ledger, inventory, visibility):
        self.state = state
        self.chains = chains
        self.api = api
        self.ledger = ledger
        self.inventory = inventory
        self.visibility = visibility

    def refusal(self, name, allowed, verb):
        """Why a command ``verb`` may not go to VM ``name`` (its record must
        be in one of the ``allowed`` states, nothing else in flight on it),
        or None. -> (record or None, the reason or None)."""
        rec = self.state.vms.get(name)
        if rec is None:
            return None, Reason("no such VM", errors.NO_SUCH_VM)
        if self.ledger.is_busy(name):
            return rec, Reason(f"busy ({self.ledger.command_on(name)} in progress)",
                               errors.BUSY)
        if rec["state"] not in allowed:
            return rec, Reason(f"cannot {verb} a VM that is {rec['state']}",
                               errors.WRONG_STATE)
        return rec, None


class _SemaphoreSlot:
    def __init__(self, sem):
        self.sem = sem

    async def __aenter__(self):
        await self.sem.acquire()

    async def __aexit__(self, *exc):
        self.sem.release()


class LNMSlots:
    """How many commands (and batches of starts of ``batch`` VMs) are in
    flight on one LNM at most."""

    def __init__(self, concurrency, batch):
        self.concurrency = concurrency
        self.batch = batch
        self._semaphores = {}

    def _get(self, key, tokens):
        sem = self._semaphores.get(key)
        if sem is None:
            sem = self._semaphores[key] = defer.DeferredSemaphore(tokens)
        return _SemaphoreSlot(sem)

    def command(self, lnm):
        return self._get(lnm, self.concurrency)

    def batch_of_starts(self, lnm):
        """Batches of starts in flight on one LNM: as many VMs at most as
        ``concurrency`` single commands (each batch's timeout covers only
        the VMs queued on the LNM before it)."""
        return self._get(("batches", lnm), max(1, self.concurrency // self.batch))

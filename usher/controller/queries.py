"""Questions users may ask plugins: the named queries plugins register.

A plugin that keeps something a user should see (its address ranges and
leases, say) registers ``api.register_query("ipam.ranges", handler)``; a
client calls ``query(name, args)`` and gets what the handler answers. The
controller holds no knowledge of what a query means: it bounds what comes
in (``usher.controller.client_link``), bounds how long the handler may take
(its plugin's timeout), and sends the answer as JSON chunks.

A handler is ``async handler(user, admin, args) -> list`` of JSON-able
items (rows): ``user`` is the caller's name, ``admin`` whether they are an
administrator, ``args`` the decoded JSON object the caller sent. It decides
what the caller may see; an UsherError it raises reaches the caller as it
is, anything else is logged with its traceback and reported as
OperationFailed.

A query belongs to the plugin instance that registered it and goes away
when that instance is dropped -- the plugin unregistered from its last
chain, or failing to start. The owner is the plugin being constructed when
the handler is registered from its ``__init__``; later, the ``owner`` given,
else the bound method's instance (a plugin registering a helper object's
method after its ``__init__`` passes ``owner=self``).
"""

import re

from twisted.internet import defer
from twisted.logger import Logger

from usher.errors import InvalidRequest, OperationFailed, UsherError
from usher.controller.client_broker import shape_problem
from usher.records import MAX_CHUNKS, decode_object, encode_chunks

log = Logger()

QUERY_NAME = re.compile(r"[a-z0-9_.]{1,64}")
# The most a query's arguments may weigh (UTF-8 bytes of their JSON text),
# as much as a start request's arguments together.
MAX_QUERY_ARGS_BYTES = 16 * 1024


def check_query_name(name):
    """-> name if it is a valid query name, else InvalidRequest."""
    if not isinstance(name, str) or QUERY_NAME.fullmatch(name) is None:
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise InvalidRequest(f"invalid query name {shown}: 1 to 64 characters of a-z, 0-9, "
                             "'_' and '.'")
    return name


def parse_query_args(args_json):
    """A caller's query arguments, JSON text -> dict; InvalidRequest unless
    it is a JSON object of at most MAX_QUERY_ARGS_BYTES, shaped as any call
    (string keys, bounded nesting)."""
    if isinstance(args_json, str):
        size = len(args_json.encode("utf-8", "surrogatepass"))
    elif isinstance(args_json, bytes):
        size = len(args_json)
    else:
        raise InvalidRequest("query arguments must be a JSON object (text)")
    if size > MAX_QUERY_ARGS_BYTES:
        raise InvalidRequest(f"query arguments of {size} bytes (at most "
                             f"{MAX_QUERY_ARGS_BYTES})")
    args = decode_object(args_json)
    problem = shape_problem(args)
    if problem:
        raise InvalidRequest(f"query arguments: {problem}")
    return args


class _Query:
    def __init__(self, name, handler, owner):
        self.name = name
        self.handler = handler
        self.owner = owner


class PluginQueries:
    """The registered queries. ``timeout_of(owner)`` -> seconds a handler of
    that owner may take (``EventChains.timeout_of``); ``clock`` runs it."""

    def __init__(self, clock, timeout_of):
        self.clock = clock
        self.timeout_of = timeout_of
        self._queries = {}

    def names(self):
        return sorted(self._queries)

    def register(self, name, handler, owner=None):
        check_query_name(name)
        if not callable(handler):
            raise InvalidRequest(f"query {name}: the handler must be callable")
        if name in self._queries:
            raise InvalidRequest(f"query {name} is already registered")
        if owner is None:
            owner = getattr(handler, "__self__", None)
        self._queries[name] = _Query(name, handler, owner)
        log.info("query {query} registered", query=name)

    def unregister(self, name):
        """-> True if ``name`` was registered (a plugin's ``stop`` may
        unregister what its removal already took away)."""
        return self._queries.pop(name, None) is not None

    def adopt(self, names, owner):
        """Make ``owner`` the owner of ``names`` (those a plugin registered
        while it was being constructed)."""
        for name in names:
            if name in self._queries:
                self._queries[name].owner = owner

    def drop_owned_by(self, owner):
        """Remove the queries of ``owner`` -> their names."""
        gone = [name for name, q in self._queries.items() if q.owner is owner]
        for name in gone:
            del self._queries[name]
        if gone:
            log.info("queries {queries} removed with their plugin", queries=", ".join(gone))
        return gone

    async def answer(self, name, user, admin, args):
        """Run query ``name`` for ``user`` -> its answer as JSON chunks."""
        query = self._queries.get(name)
        if query is None:
            known = ", ".join(self.names()) or "none"
            raise InvalidRequest(f"no such query: {name} (registered: {known})")
        timeout = self.timeout_of(query.owner)
        try:
            result = await _run(query.handler, user, admin, args).addTimeout(timeout,
                                                                              self.clock)
        except UsherError:
            raise
        except defer.TimeoutError:
            log.error("query {query} for {user} took longer than {timeout:g} s",
                      query=name, user=user, timeout=timeout)
            raise OperationFailed(f"query {name} did not answer in time") from None
        except Exception:
            log.failure("query {query} failed for {user}", query=name, user=user)
            raise OperationFailed(f"query {name} failed; see the controller's log") from None
        try:
            if not isinstance(result, (list, tuple)):
                raise TypeError(f"the handler answered a {type(result).__name__}, not a list")
            chunks = encode_chunks(result)
            if len(chunks) > MAX_CHUNKS:
                raise ValueError(f"an answer of {len(chunks)} chunks (at most {MAX_CHUNKS})")
        except Exception:   # the handler's fault, not the caller's
            log.failure("query {query} for {user} gave an answer that cannot be sent",
                        query=name, user=user)
            raise OperationFailed(f"query {name} gave an answer that cannot be sent; "
                                  "see the controller's log") from None
        return chunks


def _run(handler, *args):
    """The handler's result as a Deferred, whatever it returns (a value, a
    Deferred, a coroutine)."""
    try:
        result = handler(*args)
    except Exception:
        return defer.fail()
    if isinstance(result, defer.Deferred):
        return result
    if hasattr(result, "__await__"):
        return defer.ensureDeferred(result)
    return defer.succeed(result)

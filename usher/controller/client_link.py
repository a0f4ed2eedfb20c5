"""The controller's PB boundary towards logged-in clients: the user's
perspective (the Table 4 API) and the realm that makes it. The connection
itself is ``client_broker``'s, the login ``client_login``'s.
"""

import os

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb
from zope.interface import implementer

from usher.controller.client_broker import dispatch_call
from usher.controller.events import Event
from usher.controller.queries import check_query_name, parse_query_args
from usher.errors import (AuthenticationFailed, InvalidRequest, NoSuchLNM, NoSuchVM,
                          PermissionDenied, Rejected, UsherError)
from usher.pbutil import tell
from usher.records import encode_chunks
from usher.states import OPERATIONS
from usher.vmset import Selection

log = Logger()



def _boundary(method):
    """Run an ``async def`` perspective method as a Deferred, and never let
    an unexpected exception's details reach the client."""
    import functools

    kind = method.__name__.removeprefix("perspective_")

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        async def run():
            try:
                return await method(self, *args, **kwargs)
            except UsherError:
                raise
            except Exception:
                log.failure("internal error in {method} for {user}",
                            method=method.__name__, user=self.user)
                raise UsherError("internal error in the controller; see its log")

        async def timed():
            # Requests by kind and outcome, and their latency (metrics).
            started = self.clock.seconds()
            request_kind = kind
            if kind == "op_on" and args and args[0] in OPERATIONS:
                request_kind = args[0]
            outcome = "error"
            try:
                result = await run()
                outcome = "partial" if isinstance(result, dict) and result.get("failed") \
                    else "ok"
                return result
            except Exception as e:
                outcome = request_outcome(e)
                raise
            finally:
                self.controller.instruments.request(request_kind, outcome,
                                                    self.clock.seconds() - started)
                # The changes a request made reach the clients' caches
                # before its answer does (same connection, in order): a
                # client that reads its cache on the answer sees them.
                hub = getattr(self.controller, "hub", None)
                if hub is not None:
                    hub.flush_now()
        return defer.Deferred.fromCoroutine(timed())

    return wrapper


def request_outcome(error):
    """The outcome label of a request that failed with ``error``."""
    if isinstance(error, Rejected):
        return "rejected"
    if isinstance(error, (PermissionDenied, AuthenticationFailed)):
        return "denied"
    if isinstance(error, (InvalidRequest, NoSuchVM, NoSuchLNM)):
        return "invalid"
    return "error"


class UserPerspective(pb.Avatar):
    """One logged-in user's view of the controller (paper, Table 4)."""

    def perspectiveMessageReceived(self, broker, message, args, kw):
        return dispatch_call(self, broker, "perspective_", message, args, kw, self)

    def __init__(self, controller, user, admin, observer, *, clock, call_timeout):
        self.controller = controller
        self.user = user
        self.admin = admin
        self.observer = observer
        self.clock = clock
        self.call_timeout = call_timeout
        self.subscription = None

    def logout(self):
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None

    def _push(self, seq, chunks, removed):
        # One-way (usher.protocol): a client answering each push would double
        # the messages, and a timer per push cost more than the push.
        if not isinstance(self.observer, pb.RemoteReference):
            return None
        try:
            tell(self.observer, "vm_changes", seq, chunks, removed)
        except UsherError as e:
            # Gone, or a push it cannot take: its next push has a gap in
            # the sequence numbers and the client subscribes again.
            log.info("dropping update for {user}: {error}", user=self.user, error=e)
        return None

    @_boundary
    async def perspective_whoami(self):
        return {"user": self.user, "admin": self.admin, "domain": self.controller.domain}

    @_boundary
    async def perspective_subscribe(self, clusters=None):
        if clusters is not None:
            # As a selection of clusters would be: a list of short strings,
            # within the controller's limits.
            clusters = Selection.from_wire({"clusters": clusters},
                                           budget=self.controller.budget()).clusters
        # After a restart, the snapshot waits for the LNMs to hand over their
        # VMs (at most the recovery window): a client reconnecting then gets
        # the rebuilt state, not an empty one.
        await self.controller.settled()
        if self.subscription is not None:
            self.subscription.close()
        self.subscription = self.controller.hub.add(self.user, self.admin, clusters or None,
                                                    self._push)
        return self.subscription.snapshot(self.controller.state)

    @_boundary
    async def perspective_list(self, selection=None, status=False):
        # The controller parses the selection, within its limits.
        return await self.controller.list_chunks(self.user, self.admin, selection, bool(status))

    @_boundary
    async def perspective_list_lnm(self, patterns=(), status=False):
        if not isinstance(patterns, (list, tuple)):
            raise InvalidRequest("LNM patterns must be a list")
        return self.controller.list_lnm(self.user, self.admin, patterns, bool(status))

    @_boundary
    async def perspective_top(self, patterns=(), count=10):
        if not isinstance(patterns, (list, tuple)):
            raise InvalidRequest("LNM patterns must be a list")
        result = await self.controller.top(self.user, self.admin, patterns, count)
        return {"lnms": result["lnms"], "vms": encode_chunks(result["vms"])}

    @_boundary
    async def perspective_start(self, vms=(), lnms=(), args=None):
        return await self.controller.start(self.user, self.admin, vms, lnms, args)

    @_boundary
    async def perspective_op_on(self, operation, selection, args=None):
        if not isinstance(operation, str):
            raise InvalidRequest("operation must be a string")
        return await self.controller.op_on(self.user, self.admin, operation, selection, args)

    @_boundary
    async def perspective_migrate(self, selection, lnms=(), args=None):
        return await self.controller.migrate(self.user, self.admin, selection, lnms, args)

    @_boundary
    async def perspective_query(self, name, args_json="{}"):
        # Bounded here; what the caller may see is the handler's business.
        check_query_name(name)
        args = parse_query_args(args_json)
        if self.controller.plugins is None:
            raise InvalidRequest(f"no such query: {name} (registered: none)")
        return await self.controller.plugins.queries.answer(name, self.user, self.admin, args)

    # -- affinity (issue 15) --

    @_boundary
    async def perspective_affinity(self, cluster, rule=None):
        if not isinstance(cluster, str) or len(cluster) > 128:
            raise InvalidRequest("the cluster must be a name of at most 128 characters")
        if rule is not None and (not isinstance(rule, str) or len(rule) > 16):
            raise InvalidRequest("the rule must be apart, together or none")
        return await self.controller.set_affinity(self.user, self.admin, cluster, rule)

    # -- plugin administration -------------------------------------------------

    def _require_admin(self):
        if not self.admin:
            raise PermissionDenied("only administrators may manage plugins")

    @_boundary
    async def perspective_plugins(self):
        self._require_admin()
        return self.controller.plugins.describe()

    @_boundary
    async def perspective_register_plugin(self, name, event, config_file=None, order=None):
        self._require_admin()
        if not all(isinstance(v, str) for v in (name, event)) or (
                config_file is not None and not isinstance(config_file, str)):
            raise InvalidRequest("plugin name, event and config file must be strings")
        if order is not None and not isinstance(order, int):
            raise InvalidRequest("order must be an integer")
        if config_file is not None and not os.path.isabs(config_file):
            # Relative to what? The controller's working directory is no
            # place a client can know.
            raise InvalidRequest(f"the plugin configuration file must be an absolute path "
                                 f"on the controller's host, not {config_file!r}")
        self.controller.plugins.register(name, event, config_file, order)
        return self.controller.plugins.describe()

    @_boundary
    async def perspective_unregister_plugin(self, name, event=None):
        self._require_admin()
        if not isinstance(name, str) or (event is not None and not isinstance(event, str)):
            raise InvalidRequest("plugin name and event must be strings")
        self.controller.plugins.unregister(name, event)
        return self.controller.plugins.describe()

    @_boundary
    async def perspective_forget_lnm(self, name):
        if not self.admin:
            raise PermissionDenied("only administrators may forget LNMs")
        if not isinstance(name, str):
            raise InvalidRequest("LNM name must be a string")
        return {"lnm": name, "forgotten": self.controller.forget_lnm(name)}

    # -- part A: maintenance and evacuation (issue 15) --

    @_boundary
    async def perspective_maintenance(self, lnm, on, reason=None, evacuate=False,
                                      concurrency=None):
        if not self.admin:
            raise PermissionDenied("only administrators may put LNMs into maintenance")
        if not isinstance(lnm, str):
            raise InvalidRequest("LNM name must be a string")
        if not isinstance(on, bool) or not isinstance(evacuate, bool):
            raise InvalidRequest("on and evacuate must be true or false")
        return await self.controller.maintenance.set(lnm, on, by=self.user, reason=reason,
                                                     evacuate=evacuate,
                                                     concurrency=concurrency)

    @_boundary
    async def perspective_evacuation(self, lnm):
        if not self.admin:
            raise PermissionDenied("only administrators may see evacuations")
        if not isinstance(lnm, str):
            raise InvalidRequest("LNM name must be a string")
        return self.controller.maintenance.status(lnm)

    # -- HA restart only with fencing (issue 15, part B) ---------------------------

    @_boundary
    async def perspective_confirm_fenced(self, lnm, evidence=None):
        if not self.admin:
            raise PermissionDenied("only administrators may confirm that a host is fenced")
        if not isinstance(lnm, str) or len(lnm) > 255:
            raise InvalidRequest("LNM name must be a string of at most 255 characters")
        if evidence is None:
            evidence = f"confirmed by the administrator {self.user}"
        if not isinstance(evidence, str):
            raise InvalidRequest("evidence must be a string")
        details = self.controller.confirm_fenced(lnm, evidence=evidence, by=self.user)
        return {"lnm": lnm, "fenced": details}


async def _no_role(user):
    return None


@implementer(IRealm)
class UsherRealm:
    def __init__(self, controller, *, clock, call_timeout, role_of=None):
        self.controller = controller
        self.clock = clock
        self.call_timeout = call_timeout
        self.role_of = role_of or _no_role

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("only PB perspectives")
        return defer.Deferred.fromCoroutine(self._avatar(avatar_id, mind))

    async def _avatar(self, avatar_id, mind):
        user = avatar_id.decode() if isinstance(avatar_id, bytes) else avatar_id
        admin = self.controller.is_admin(user, await self.role_of(user))
        avatar = UserPerspective(self.controller, user, admin, mind, clock=self.clock,
                                 call_timeout=self.call_timeout)
        self.controller.chains.notify(Event("user_authenticated", self.controller.api,
                                            user=user, admin=admin))
        self.controller.client_sessions += 1
        # Notices for this user reach this session (issue 15, leases).
        notices = (self.controller.notices.add(user, mind)
                   if isinstance(mind, pb.RemoteReference) else None)
        ended = []

        def logout():
            if not ended:   # count each session once, however often it is ended
                ended.append(True)
                self.controller.client_sessions -= 1
                if notices is not None:
                    notices.close()
            avatar.logout()
        return pb.IPerspective, avatar, logout

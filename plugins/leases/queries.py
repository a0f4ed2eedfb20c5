"""The leases plugin's queries, ``leases.list`` and ``leases.renew``: what
a caller sent is checked (keys, types, sizes) before anything is looked up;
a user sees and renews the leases of their own VMs, an administrator
anyone's."""

from usher.cliargs import duration_seconds
from usher.errors import InvalidRequest, NoSuchVM, PermissionDenied
from usher.naming import check_label, check_user, qualify, split

# Names one query may give (as many as ush sends for a cluster's VMs).
MAX_NAMES = 1000
MAX_NAME_LENGTH = 255


def _keys(args, allowed, query):
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise InvalidRequest(f"{query}: unknown argument(s) {', '.join(map(repr, unknown[:5]))}"
                             f"; known: {', '.join(allowed)}")


def _names(value, query):
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f"{query}: vms must be a non-empty list of VM names")
    if len(value) > MAX_NAMES:
        raise InvalidRequest(f"{query}: at most {MAX_NAMES} VM names")
    for name in value:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise InvalidRequest(f"{query}: VM names are strings of 1 to {MAX_NAME_LENGTH} "
                                 "characters")
    return value


class Selected:
    """The VMs a query names: ``vms`` (names, short ones the caller's) or
    ``cluster`` (with ``owner`` for administrators), or none: every VM of
    the caller with a lease (an administrator: every lease)."""

    def __init__(self, state, domain, user, admin, args, query):
        self.state = state
        self.domain = domain
        self.user = user
        self.admin = admin
        self.query = query
        vms, cluster, owner = args.get("vms"), args.get("cluster"), args.get("owner")
        if vms is not None and cluster is not None:
            raise InvalidRequest(f"{query}: give vms or cluster, not both")
        if owner is not None:
            if not isinstance(owner, str):
                raise InvalidRequest(f"{query}: owner must be a user name")
            check_user(owner)
            if owner != user and not admin:
                raise PermissionDenied(f"{query}: only administrators may name another "
                                       "user's VMs")
        self.owner = owner
        self.names = [self._qualify(n) for n in _names(vms, query)] if vms is not None else None
        self.cluster = (check_label(cluster, "cluster name") if isinstance(cluster, str)
                        else cluster)
        if cluster is not None and not isinstance(cluster, str):
            raise InvalidRequest(f"{query}: cluster must be a cluster name")

    def _qualify(self, name):
        full = name.strip().lower().rstrip(".")
        parts = split(full, self.domain)
        if parts is not None and (self.admin or parts[1] == self.user):
            return full
        return qualify(name, self.owner or self.user, self.domain)

    def records(self):
        """-> the records of the VMs named (each must exist and be the
        caller's, unless an administrator asks), or of the cluster's."""
        vms = self.state.vms
        if self.names is not None:
            missing = [n for n in self.names if n not in vms]
            if missing:
                raise NoSuchVM(f"no such VM: {', '.join(missing[:5])}")
            foreign = [n for n in self.names
                       if vms[n].get("owner") != self.user and not self.admin]
            if foreign:
                raise PermissionDenied(f"not your VM: {', '.join(foreign[:5])}")
            return [vms[n] for n in dict.fromkeys(self.names)]
        owner = self.owner or self.user
        if self.cluster is not None:
            found = [r for r in self.state.owned_view(owner).values()
                     if r.get("cluster") == self.cluster]
            if not found:
                raise NoSuchVM(f"no VM in cluster {self.cluster} of {owner}")
            return found
        return None


def list_args(state, domain, user, admin, args):
    _keys(args, ("vms", "cluster", "owner"), "leases.list")
    return Selected(state, domain, user, admin, args, "leases.list")


def renew_args(state, domain, user, admin, args):
    """-> (Selected, seconds)."""
    _keys(args, ("vms", "cluster", "owner", "duration"), "leases.renew")
    if args.get("vms") is None and args.get("cluster") is None:
        raise InvalidRequest("leases.renew: name the VMs (vms) or a cluster (cluster)")
    raw = args.get("duration")
    if raw is None:
        raise InvalidRequest("leases.renew: duration is missing (e.g. \"2h\")")
    try:
        seconds = duration_seconds(raw)
    except ValueError as e:
        raise InvalidRequest(f"leases.renew: duration: {e}") from None
    return Selected(state, domain, user, admin, args, "leases.renew"), seconds

"""The SQL plugin's answers to users: the queries ``ipam.ranges`` (the
caller's address ranges, and the open ones, with free counts) and
``ipam.addresses`` (the addresses the caller's VMs hold) that ``ush ranges``
and ``ush addresses`` ask; administrators see every user's, or one
``owner``'s. Each runs on the plugin's database thread, never on the
reactor."""

from usher import naming
from usher.errors import InvalidRequest, OperationFailed, PermissionDenied
from usher.plugins.sql import ipam
from usher.plugins.sql.store import DatabaseUnavailable

RANGES_QUERY = "ipam.ranges"
ADDRESSES_QUERY = "ipam.addresses"
ARGUMENTS = ("owner",)


def whose(user, admin, args):
    """The ``owner`` a caller asks about (None: their own, or all for an
    administrator); InvalidRequest / PermissionDenied for what they may not
    ask."""
    unknown = sorted(set(args) - set(ARGUMENTS))
    if unknown:
        raise InvalidRequest(f"unknown query arguments: {', '.join(unknown)} "
                             f"(known: {', '.join(ARGUMENTS)})")
    owner = args.get("owner")
    if owner is None:
        return None
    naming.check_user(owner)
    if not admin and owner != user:
        raise PermissionDenied("only administrators may see other users' addresses")
    return owner


class UserQueries:
    """The two queries over ``worker`` (a DatabaseWorker)."""

    def __init__(self, worker):
        self.worker = worker

    def register(self, api, owner):
        api.register_query(RANGES_QUERY, self.ranges, owner=owner)
        api.register_query(ADDRESSES_QUERY, self.addresses, owner=owner)

    async def ranges(self, user, admin, args):
        return await self._ask(ipam.ranges_for, user, admin, whose(user, admin, args))

    async def addresses(self, user, admin, args):
        return await self._ask(ipam.leases_for, user, admin, whose(user, admin, args))

    async def _ask(self, query, user, admin, owner):
        try:
            return await self.worker.call(query, user, admin, owner)
        except DatabaseUnavailable as e:
            raise OperationFailed(f"the address database is unavailable: {e}") from None
        except ipam.IpamError as e:
            raise InvalidRequest(str(e)) from None

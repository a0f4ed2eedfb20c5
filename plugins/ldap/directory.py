"""The blocking directory client every LDAP user of Usher shares (ldap3).

Layout under ``base_dn`` (``dc=usher,dc=local`` by default):

- ``uid=NAME,ou=people,BASE``: an Usher user (``inetOrgPerson`` +
  ``posixAccount``; ``userPassword`` a salted hash, never plaintext);
- ``cn=ADMIN_GROUP,ou=groups,BASE``: ``posixGroup`` whose ``memberUid``
  values have the Usher ``admin`` role;
- ``ou=OWNER,ou=clusters,BASE``: the owner's container, and under it one
  branch per cluster, ``ou=CLUSTER``, holding ``ou=people`` (the owner as an
  ``alias`` of their global entry, plus accounts the in-VM tool adds) and
  ``ou=groups`` (``cn=admin``, a ``posixGroup`` of ``cluster_admin_gid`` with
  the owner as ``memberUid``).

Every method blocks (callers run it in a thread: ``api.run_blocking`` or a
pool given in) and opens its own connection, so one ``Directory`` may be
shared by threads. Each connection has ``call_timeout`` for the connect and
for every answer. A server that is down, unreachable, too slow or busy raises
``DirectoryUnavailable``; "no such user" and "wrong password" are answers
(False / None). Values placed in DNs are escaped with ``escape_rdn``, in
filters with ``escape_filter_chars``, and names are checked again with
``usher.naming`` first. Passwords are never logged nor put in exceptions.
"""

from __future__ import annotations

import contextlib
import math
import ssl

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn
from ldap3.utils.hashed import hashed
from twisted.logger import Logger

from usher import naming
from usher.errors import InvalidRequest, UsherError
# DirectoryConfig and load_config are the config module's; here too, for
# the callers of this one.
from usher.plugins.ldap.config import (  # noqa: F401 - re-exported
    DEFAULT_CONFIG_FILE, DirectoryConfig, load_config)

log = Logger()

# LDAP result codes the client tells apart.
INVALID_CREDENTIALS = 49
INSUFFICIENT_ACCESS = 50
BUSY = 51
UNAVAILABLE = 52
NO_SUCH_OBJECT = 32
ALREADY_EXISTS = 68
NOT_ALLOWED_ON_NON_LEAF = 66
TYPE_OR_VALUE_EXISTS = 20
NO_SUCH_ATTRIBUTE = 16
UNAVAILABLE_CODES = frozenset({BUSY, UNAVAILABLE, 3, 11})   # + timeLimitExceeded, adminLimit

# What ldap3 raises when the server cannot be reached or stops answering.
_NETWORK_ERRORS = (ldap_errors.LDAPCommunicationError, ldap_errors.LDAPResponseTimeoutError,
                   ldap_errors.LDAPMaximumRetriesError, ldap_errors.LDAPStartTLSError,
                   OSError)
PAGE_SIZE = 200


class DirectoryError(UsherError):
    """The directory refused an operation (the message says which and why)."""


class DirectoryUnavailable(DirectoryError):
    """The server is down, unreachable, busy or did not answer in time."""


def _hash_password(password: str) -> str:
    """-> ``{SSHA}...``: a salted SHA-1 hash, as slapd checks it."""
    value = hashed(ldap3.HASHED_SALTED_SHA, password)
    return "{SSHA}" + value[len("{ssha}"):]


def load_directory(path=DEFAULT_CONFIG_FILE) -> Directory:
    """-> a Directory for the ``ldap.config`` at ``path``."""
    return Directory(load_config(path))


class Directory:
    """The blocking client (see the module's docstring)."""

    def __init__(self, config: DirectoryConfig):
        self.config = config
        base = config.base_dn
        self.people_dn = f"ou=people,{base}"
        self.groups_dn = f"ou=groups,{base}"
        self.clusters_dn = f"ou=clusters,{base}"
        self.admin_group_dn = f"cn={escape_rdn(config.admin_group)},{self.groups_dn}"
        self._tls = None
        if config.url.startswith("ldaps://"):
            self._tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file)

    def __repr__(self):
        return f"<Directory {self.config.url} {self.config.base_dn}>"

    # -- names ------------------------------------------------------------------------

    def user_dn(self, user: str) -> str:
        return f"uid={escape_rdn(naming.check_user(user))},{self.people_dn}"

    def owner_dn(self, owner: str) -> str:
        return f"ou={escape_rdn(naming.check_user(owner))},{self.clusters_dn}"

    def branch_dn(self, owner: str, cluster: str) -> str:
        cluster = naming.check_label(cluster, "cluster name")
        return f"ou={escape_rdn(cluster)},{self.owner_dn(owner)}"

    # -- connections ---------------------------------------------------------------------

    def _open(self, user_dn, password) -> ldap3.Connection:
        # A Server of its own each time: ldap3's remembers addresses that
        # failed once and would not try them again after the server is back.
        server = ldap3.Server(self.config.url, connect_timeout=self.config.call_timeout,
                              get_info=ldap3.NONE, tls=self._tls)
        return ldap3.Connection(
            server, user=user_dn, password=password, raise_exceptions=False,
            # ldap3 packs it into SO_RCVTIMEO: whole seconds.
            receive_timeout=max(1, math.ceil(self.config.call_timeout)), auto_referrals=False,
            client_strategy=ldap3.SYNC)

    def _unavailable(self, error) -> DirectoryUnavailable:
        # ldap3's messages name the socket's trouble, never the credentials.
        detail = (str(error).splitlines() or [""])[0][:200]
        return DirectoryUnavailable(
            f"the LDAP server {self.config.url} is unavailable: {type(error).__name__}"
            + (f" ({detail})" if detail else ""))

    @contextlib.contextmanager
    def _service(self):
        """A connection bound as the service account (``bind_dn``)."""
        connection = self._open(self.config.bind_dn, self.config.bind_password)
        try:
            try:
                bound = connection.bind()
            except _NETWORK_ERRORS as e:
                raise self._unavailable(e) from None
            if not bound:
                code = connection.result.get("result")
                if code in UNAVAILABLE_CODES or code is None:
                    raise DirectoryUnavailable(
                        f"the LDAP server {self.config.url} is unavailable: "
                        f"{connection.result.get('description')}")
                raise DirectoryError(
                    f"the LDAP server {self.config.url} refused the service account "
                    f"{self.config.bind_dn} ({connection.result.get('description')}): check "
                    f"bind_dn and bind_password_file in {self.config.source}")
            yield connection
        except _NETWORK_ERRORS as e:
            raise self._unavailable(e) from None
        finally:
            with contextlib.suppress(Exception):
                connection.unbind()

    def _check(self, connection, ok, what, tolerate=()) -> bool:
        """An operation's outcome -> True, False (a tolerated code), or raises."""
        if ok:
            return True
        result = connection.result or {}
        code = result.get("result")
        if code in tolerate:
            return False
        if code in UNAVAILABLE_CODES:
            raise DirectoryUnavailable(f"the LDAP server {self.config.url} is unavailable "
                                       f"({result.get('description')}) while {what}")
        message = (result.get("message") or "").strip()
        raise DirectoryError(f"LDAP {what}: {result.get('description')}"
                             + (f" ({message})" if message else ""))

    def _search(self, connection, base, search_filter, attributes, scope=ldap3.SUBTREE,
                what="search", paged=False):
        """-> list of entries as dicts {"dn": ..., "attributes": {...}}; [] for no base."""
        kwargs = dict(search_base=base, search_filter=search_filter, search_scope=scope,
                      attributes=attributes, dereference_aliases=ldap3.DEREF_NEVER,
                      time_limit=max(1, math.ceil(self.config.call_timeout)))
        if not paged:
            ok = connection.search(**kwargs)
            if not self._check(connection, ok or connection.result.get("result") == 0, what,
                               tolerate=(NO_SUCH_OBJECT,)):
                return []
            return [e for e in connection.response or () if e.get("type") == "searchResEntry"]
        found = []
        for entry in connection.extend.standard.paged_search(
                **kwargs, paged_size=PAGE_SIZE, generator=True):
            if entry.get("type") == "searchResEntry":
                found.append(entry)
        code = (connection.result or {}).get("result")
        if code not in (0, NO_SUCH_OBJECT, None):
            self._check(connection, False, what)
        return found

    # -- authentication --------------------------------------------------------------------

    def authenticate(self, user, password) -> bool:
        """Bind as ``user`` -> whether the password is right (False for an
        unknown user); DirectoryUnavailable when the server cannot say."""
        try:
            dn = self.user_dn(user)
        except InvalidRequest:
            return False
        if not isinstance(password, str) or not password:
            return False    # an empty password would be an unauthenticated bind
        connection = self._open(dn, password)
        try:
            bound = connection.bind()
        except _NETWORK_ERRORS as e:
            raise self._unavailable(e) from None
        finally:
            with contextlib.suppress(Exception):
                connection.unbind()
        if bound:
            return True
        code = connection.result.get("result")
        if code == INVALID_CREDENTIALS:
            return False
        if code in UNAVAILABLE_CODES or code is None:
            raise DirectoryUnavailable(f"the LDAP server {self.config.url} is unavailable: "
                                       f"{connection.result.get('description')}")
        # Anything else (e.g. an account the server locks) is a refusal.
        log.info("LDAP bind of {user} refused: {reason}", user=user,
                 reason=connection.result.get("description"))
        return False

    def is_admin(self, user) -> bool:
        """Is ``user`` a memberUid of the admin group?"""
        user = naming.check_user(user)
        with self._service() as connection:
            found = self._search(connection, self.admin_group_dn,
                                 f"(memberUid={escape_filter_chars(user)})", ["cn"],
                                 scope=ldap3.BASE, what="reading the admin group")
        return bool(found)

    # -- users ---------------------------------------------------------------------------

    def user_ids(self, user):
        """-> (uidNumber, gidNumber) of ``user``, or None when there is no such user."""
        with self._service() as connection:
            found = self._search(connection, self.user_dn(user), "(objectClass=posixAccount)",
                                 ["uidNumber", "gidNumber"], scope=ldap3.BASE,
                                 what=f"reading user {user}")
        if not found:
            return None
        attributes = found[0]["attributes"]
        try:
            return int(_single(attributes["uidNumber"])), int(_single(attributes["gidNumber"]))
        except (KeyError, TypeError, ValueError):
            return None

    def _exists(self, connection, dn) -> bool:
        return bool(self._search(connection, dn, "(objectClass=*)", ["1.1"], scope=ldap3.BASE,
                                 what=f"looking up {dn}"))

    def user_exists(self, user) -> bool:
        with self._service() as connection:
            return self._exists(connection, self.user_dn(user))

    def _next_uid(self, connection) -> int:
        found = self._search(connection, self.people_dn,
                             f"(&(objectClass=posixAccount)(uidNumber>={self.config.uid_min}))",
                             ["uidNumber"], what="reading the uid numbers in use", paged=True)
        used = set()
        for entry in found:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                used.add(int(_single(entry["attributes"]["uidNumber"])))
        return max(used) + 1 if used else self.config.uid_min

    def add_user(self, user, password, *, admin=False, uid_number=None, gid_number=None,
                 full_name=None) -> int:
        """Add ``user`` (InvalidRequest if they exist) -> their uidNumber: the
        next free one from ``uid_min`` unless given."""
        dn = self.user_dn(user)
        _check_password(password)
        with self._service() as connection:
            if self._exists(connection, dn):
                raise InvalidRequest(f"user {user!r} already exists in {self.config.url}")
            uid_number = self._next_uid(connection) if uid_number is None else int(uid_number)
            gid_number = self.config.default_gid if gid_number is None else int(gid_number)
            attributes = {
                "uid": user, "cn": full_name or user, "sn": user,
                "uidNumber": uid_number, "gidNumber": gid_number,
                "homeDirectory": self.config.home_template.replace("{user}", user),
                "loginShell": self.config.login_shell,
                "userPassword": _hash_password(password)}
            ok = connection.add(dn, ["inetOrgPerson", "posixAccount"], attributes)
            if not self._check(connection, ok, f"adding user {user}", tolerate=(ALREADY_EXISTS,)):
                raise InvalidRequest(f"user {user!r} already exists in {self.config.url}")
            if admin:
                self._set_admin(connection, user, True)
        log.info("LDAP: added user {user} (uidNumber {uid})", user=user, uid=uid_number)
        return uid_number

    def set_password(self, user, password) -> None:
        """Replace ``user``'s password (InvalidRequest if there is no such user)."""
        dn = self.user_dn(user)
        _check_password(password)
        with self._service() as connection:
            ok = connection.modify(
                dn, {"userPassword": [(ldap3.MODIFY_REPLACE, [_hash_password(password)])]})
            if not self._check(connection, ok, f"changing the password of {user}",
                               tolerate=(NO_SUCH_OBJECT,)):
                raise InvalidRequest(f"no user {user!r} in {self.config.url}")

    def delete_user(self, user) -> None:
        """Delete ``user``'s entry and admin membership (InvalidRequest if
        there is no such user). Their cluster branches stay (the plugin's)."""
        dn = self.user_dn(user)
        with self._service() as connection:
            ok = connection.delete(dn)
            if not self._check(connection, ok, f"deleting user {user}",
                               tolerate=(NO_SUCH_OBJECT,)):
                raise InvalidRequest(f"no user {user!r} in {self.config.url}")
            self._set_admin(connection, user, False)
        log.info("LDAP: deleted user {user}", user=user)

    def set_admin(self, user, admin: bool) -> None:
        naming.check_user(user)
        with self._service() as connection:
            self._set_admin(connection, user, admin)

    def _set_admin(self, connection, user, admin):
        change = ldap3.MODIFY_ADD if admin else ldap3.MODIFY_DELETE
        ok = connection.modify(self.admin_group_dn, {"memberUid": [(change, [user])]})
        if not self._check(connection, ok, "changing the admin group",
                           tolerate=(TYPE_OR_VALUE_EXISTS, NO_SUCH_ATTRIBUTE, NO_SUCH_OBJECT)):
            if admin and connection.result.get("result") == NO_SUCH_OBJECT:
                raise DirectoryError(f"the admin group {self.admin_group_dn} does not exist "
                                     f"(admin_group in {self.config.source})")

    def list_users(self) -> list[tuple[str, str | None]]:
        """-> [(name, "admin" or None)], sorted by name."""
        with self._service() as connection:
            found = self._search(connection, self.people_dn, "(objectClass=posixAccount)",
                                 ["uid"], scope=ldap3.LEVEL, what="listing users", paged=True)
            admins = self._search(connection, self.admin_group_dn, "(objectClass=*)",
                                  ["memberUid"], scope=ldap3.BASE, what="reading the admin group")
        admin_names = set(admins[0]["attributes"].get("memberUid") or ()) if admins else set()
        names = sorted({_single(e["attributes"].get("uid")) for e in found} - {None})
        return [(name, "admin" if name in admin_names else None) for name in names]

    # -- cluster branches ----------------------------------------------------------------

    def ensure_cluster_branch(self, owner, cluster) -> bool:
        """Make the branch of ``owner``'s ``cluster`` (and the owner's container)
        where missing, with the owner in its ``admin`` group -> whether
        anything was added. Idempotent."""
        branch = self.branch_dn(owner, cluster)
        owner_rdn = escape_rdn(owner)
        entries = [
            (self.owner_dn(owner), ["organizationalUnit"], {"ou": owner}),
            (branch, ["organizationalUnit"], {"ou": cluster,
                                               "description": f"Usher cluster {cluster} of {owner}"}),
            (f"ou=people,{branch}", ["organizationalUnit"], {"ou": "people"}),
            (f"ou=groups,{branch}", ["organizationalUnit"], {"ou": "groups"}),
            (f"uid={owner_rdn},ou=people,{branch}", ["alias", "extensibleObject"],
             {"uid": owner, "aliasedObjectName": self.user_dn(owner)}),
            (f"cn=admin,ou=groups,{branch}", ["posixGroup"],
             {"cn": "admin", "gidNumber": self.config.cluster_admin_gid, "memberUid": owner}),
        ]
        added = False
        with self._service() as connection:
            for dn, classes, attributes in entries:
                ok = connection.add(dn, classes, attributes)
                added |= self._check(connection, ok, f"adding {dn}", tolerate=(ALREADY_EXISTS,))
            # An admin group that existed without its owner gets them back.
            ok = connection.modify(f"cn=admin,ou=groups,{branch}",
                                   {"memberUid": [(ldap3.MODIFY_ADD, [owner])]})
            added |= self._check(connection, ok, "adding the owner to the admin group",
                                 tolerate=(TYPE_OR_VALUE_EXISTS,))
        if added:
            log.info("LDAP: cluster branch {branch} made", branch=branch)
        return added

    def remove_cluster_branch(self, owner, cluster) -> bool:
        """Delete the whole subtree of the branch (and the owner's container
        when it is left empty) -> whether there was a branch."""
        branch = self.branch_dn(owner, cluster)
        with self._service() as connection:
            found = self._search(connection, branch, "(objectClass=*)", ["1.1"],
                                 what=f"reading {branch}", paged=True)
            if not found:
                return False
            # Leaves first: the deepest DNs go before their parents.
            for dn in sorted((e["dn"] for e in found), key=lambda d: -len(parse_dn(d))):
                ok = connection.delete(dn)
                self._check(connection, ok, f"deleting {dn}", tolerate=(NO_SUCH_OBJECT,))
            ok = connection.delete(self.owner_dn(owner))
            self._check(connection, ok, "deleting the owner's container",
                        tolerate=(NOT_ALLOWED_ON_NON_LEAF, NO_SUCH_OBJECT))
        log.info("LDAP: cluster branch {branch} removed ({count} entries)", branch=branch,
                 count=len(found))
        return True

    def cluster_branches(self) -> set[tuple[str, str]]:
        """-> {(owner, cluster)} of every branch in the directory (names that
        are not valid owner/cluster names are left out)."""
        with self._service() as connection:
            owners = self._search(connection, self.clusters_dn, "(objectClass=organizationalUnit)",
                                  ["ou"], scope=ldap3.LEVEL, what="listing cluster owners",
                                  paged=True)
            branches = set()
            for entry in owners:
                owner = _rdn_value(entry["dn"])
                if not _valid(naming.check_user, owner):
                    continue
                for child in self._search(connection, entry["dn"],
                                          "(objectClass=organizationalUnit)", ["ou"],
                                          scope=ldap3.LEVEL, what="listing cluster branches",
                                          paged=True):
                    cluster = _rdn_value(child["dn"])
                    if _valid(naming.check_label, cluster):
                        branches.add((owner, cluster))
        return branches

    def cluster_admins(self, owner, cluster) -> list[str]:
        """-> the memberUid values of the branch's ``admin`` group ([] if none)."""
        group = f"cn=admin,ou=groups,{self.branch_dn(owner, cluster)}"
        with self._service() as connection:
            found = self._search(connection, group, "(objectClass=posixGroup)", ["memberUid"],
                                 scope=ldap3.BASE, what=f"reading {group}")
        if not found:
            return []
        return sorted(found[0]["attributes"].get("memberUid") or [])


def _single(value):
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _rdn_value(dn):
    return parse_dn(dn)[0][1].lower()


def _valid(check, value):
    try:
        check(value)
    except InvalidRequest:
        return False
    return True


def _check_password(password):
    if not isinstance(password, str) or not password:
        raise InvalidRequest("the password is empty")
    if "\0" in password or "\n" in password:
        raise InvalidRequest("the password holds a NUL or newline character")

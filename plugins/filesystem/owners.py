"""Where a tree owner's uid and gid come from (``uid_source``): the host's
name service (``nss``), the plugin's own ``[users]`` table (``static``) or
the LDAP directory (``ldap``). Every lookup may block (NSS may ask a
network service; LDAP does): callers run it off the reactor."""

import pwd
import re
import threading

from twisted.logger import Logger

from usher.naming import check_user

log = Logger()

IDS_RE = re.compile(r"(\d{1,10}):(\d{1,10})")
# uid/gid 4294967295 is (uid_t)-1: "unchanged" to chown.
MAX_ID = 2**32 - 2


class IdsUnavailable(Exception):
    """The source of ids cannot answer now (the directory is down)."""


def parse_ids(text):
    """``"1000:1000"`` -> (1000, 1000); ValueError for anything else."""
    match = IDS_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not UID:GID (two numbers, e.g. 1000:1000)")
    uid, gid = int(match.group(1)), int(match.group(2))
    if uid > MAX_ID or gid > MAX_ID:
        raise ValueError(f"{text!r}: ids go up to {MAX_ID}")
    return uid, gid


def _checked(uid, gid):
    """Ids from outside the configuration (NSS, a directory answer)."""
    if (isinstance(uid, bool) or isinstance(gid, bool) or not isinstance(uid, int)
            or not isinstance(gid, int) or not 0 <= uid <= MAX_ID or not 0 <= gid <= MAX_ID):
        return None
    return uid, gid


class NssIds:
    source = "nss"

    def user_ids(self, owner):
        try:
            entry = pwd.getpwnam(check_user(owner))
        except KeyError:
            return None
        return _checked(entry.pw_uid, entry.pw_gid)


class StaticIds:
    """``[users]`` ``alice = 1000:1000`` (checked when the configuration is
    read), else ``default_ids`` (None: such an owner has no ids)."""

    source = "static"

    def __init__(self, users, default=None):
        self.users = dict(users)
        self.default = default

    def user_ids(self, owner):
        return self.users.get(owner, self.default)


class LdapIds:
    """``uidNumber``/``gidNumber`` of the owner's entry, through the LDAP
    plugin's directory client (``usher.plugins.ldap.directory``), loaded from
    ``ldap_config`` at the first lookup (imported only when used)."""

    source = "ldap"

    def __init__(self, ldap_config, directory=None):
        self.ldap_config = ldap_config
        self._directory = directory
        self._loading = threading.Lock()     # lookups run in several pool threads

    def _loaded(self):
        with self._loading:
            if self._directory is None:
                from usher.plugins.ldap.directory import load_directory
                self._directory = load_directory(self.ldap_config)
            return self._directory

    def user_ids(self, owner):
        check_user(owner)
        try:
            answer = self._loaded().user_ids(owner)
        except Exception as e:
            if _is_unavailable(e):
                raise IdsUnavailable(f"the LDAP directory is unavailable "
                                     f"({e.__class__.__name__})") from None
            raise
        if answer is None:
            return None
        try:
            uid, gid = answer
        except (TypeError, ValueError):
            log.warn("filesystem: the directory's ids of {owner} are not (uid, gid): ignored",
                     owner=owner)
            return None
        ids = _checked(uid, gid)
        if ids is None:
            log.warn("filesystem: the directory's ids of {owner} are out of range: ignored",
                     owner=owner)
        return ids


def _is_unavailable(error):
    try:
        from usher.plugins.ldap.directory import DirectoryUnavailable
    except ImportError:
        DirectoryUnavailable = None
    if DirectoryUnavailable is not None and isinstance(error, DirectoryUnavailable):
        return True
    return isinstance(error, (OSError, TimeoutError)) or \
        type(error).__name__ == "DirectoryUnavailable"

"""The controller's local password file.

One user per line, ``username:bcrypt-hash[:role]``; ``#`` starts a comment
line and blank lines are ignored. Example::

    # Usher users (managed with `usher user ...`)
    alice:$2b$12$....................................................:admin
    bob:$2b$12$....................................................

Every function here is blocking (file I/O, bcrypt): the controller calls them
from a thread pool, the ``usher`` admin command calls them directly.

Edits are read-modify-write under an advisory lock on ``<file>.lock`` and
replace the file atomically (temporary file + ``os.replace``), so a controller
reading it concurrently sees either the old or the new version. Comment lines
survive edits. Invalid input raises ``usher.errors.InvalidRequest`` and leaves
the file untouched; an unreadable or malformed file raises
``usher.errors.ConfigError`` naming the file (and line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import stat
import tempfile

import bcrypt

from usher.errors import ConfigError, InvalidRequest

DEFAULT_PASSWD_FILE = "/etc/usher/passwd"

# bcrypt cost used by the product; tests pass a low value explicitly.
DEFAULT_ROUNDS = 12

# bcrypt only looks at the first 72 bytes; bcrypt >= 5 refuses longer input
# rather than truncating, and so do we (silently ignoring the end of a
# password would surprise its owner).
MAX_PASSWORD_BYTES = 72

# Usernames end up as DNS labels inside VM names, hence the narrow alphabet.
USERNAME_PATTERN = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
ROLE_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_BCRYPT_HASH_PATTERN = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")

_NEW_FILE_MODE = 0o600


@dataclasses.dataclass(frozen=True)
class PasswdEntry:
    """One user of the password file."""

    username: str
    password_hash: str
    role: str | None = None

    @property
    def cost(self) -> int:
        """The bcrypt cost factor (log2 rounds) of this entry's hash."""
        return int(_BCRYPT_HASH_PATTERN.fullmatch(self.password_hash).group(1))

    def to_line(self) -> str:
        fields = [self.username, self.password_hash]
        if self.role:
            fields.append(self.role)
        return ":".join(fields)


def validate_username(username) -> str:
    """Return ``username`` if it is a valid Usher user name, else raise InvalidRequest."""
    if not isinstance(username, str) or not USERNAME_PATTERN.fullmatch(username):
        raise InvalidRequest(
            f"invalid user name {username!r}: use 1-32 characters from a-z, 0-9, '_' "
            f"and '-', starting with a letter or '_'")
    return username


def validate_role(role) -> str | None:
    """Return ``role`` (None or a valid role name), else raise InvalidRequest."""
    if role is None:
        return None
    if not isinstance(role, str) or not ROLE_PATTERN.fullmatch(role):
        raise InvalidRequest(
            f"invalid role {role!r}: use 1-32 characters from a-z, 0-9, '_' and '-', "
            f"starting with a letter")
    return role


def _password_bytes(password) -> bytes:
    if isinstance(password, str):
        password = password.encode("utf-8")
    if not isinstance(password, bytes):
        raise InvalidRequest("the password must be a string")
    return password


def hash_password(password, rounds: int = DEFAULT_ROUNDS) -> str:
    """Return the bcrypt hash (text) of ``password``; refuse empty or over-long ones."""
    secret = _password_bytes(password)
    if not secret:
        raise InvalidRequest("the password must not be empty")
    if len(secret) > MAX_PASSWORD_BYTES:
        raise InvalidRequest(
            f"the password is {len(secret)} bytes long; bcrypt uses at most "
            f"{MAX_PASSWORD_BYTES}")
    if b"\0" in secret:
        raise InvalidRequest("the password must not contain NUL characters")
    return bcrypt.hashpw(secret, bcrypt.gensalt(rounds)).decode("ascii")


def check_password(password, password_hash: str) -> bool:
    """Return whether ``password`` matches ``password_hash``; always does one full bcrypt check."""
    secret = _password_bytes(password)
    # Over-long passwords can never match a hash we wrote, but still pay for a
    # bcrypt round so their rejection takes as long as any other.
    acceptable = 0 < len(secret) <= MAX_PASSWORD_BYTES
    matched = bcrypt.checkpw(secret[:MAX_PASSWORD_BYTES], password_hash.encode("ascii"))
    return acceptable and matched


# -- reading ------------------------------------------------------------------

@dataclasses.dataclass
class _Line:
    text: str  # the line as written, without its newline
    entry: PasswdEntry | None = None


def _parse(path: str, text: str) -> list[_Line]:
    lines = []
    seen = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            lines.append(_Line(raw))
            continue
        where = f"{path}, line {number}"
        fields = stripped.split(":")
        if len(fields) not in (2, 3):
            raise ConfigError(f"{where}: expected 'username:bcrypt-hash[:role]'")
        username, password_hash = fields[0], fields[1]
        role = fields[2] if len(fields) == 3 and fields[2] else None
        try:
            validate_username(username)
            validate_role(role)
        except InvalidRequest as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if not _BCRYPT_HASH_PATTERN.fullmatch(password_hash):
            raise ConfigError(f"{where}: the password of {username!r} is not a bcrypt hash")
        if username in seen:
            raise ConfigError(
                f"{where}: user {username!r} already defined on line {seen[username]}")
        seen[username] = number
        lines.append(_Line(raw, PasswdEntry(username, password_hash, role)))
    return lines


def _read(path: str, known_stamp=None) -> tuple[tuple, list[_Line] | None]:
    """-> (stamp, parsed lines), lines None when the file still has ``known_stamp``."""
    try:
        with open(path, "rb") as stream:
            info = os.fstat(stream.fileno())
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
            if stamp == known_stamp:
                return stamp, None
            raw = stream.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: password file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read password file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: password file is not UTF-8 text") from None
    return stamp, _parse(path, text)


def _entries(lines: list[_Line]) -> dict[str, PasswdEntry]:
    return {line.entry.username: line.entry for line in lines if line.entry}


def load(path) -> dict[str, PasswdEntry]:
    """Return {username: PasswdEntry} in file order. A missing file is a ConfigError."""
    _, lines = _read(os.fspath(path))
    return _entries(lines)


def load_if_changed(path, known_stamp=None):
    """-> (stamp, entries), with entries None when the file's stamp is still ``known_stamp``.

    The stamp is (inode, mtime in ns, size) of the file that was read, taken
    from the open descriptor, so a replacement racing with the read is noticed
    on the next call rather than missed. Pass the returned stamp back next time.
    """
    stamp, lines = _read(os.fspath(path), known_stamp)
    return stamp, (None if lines is None else _entries(lines))


def _read_lines(path: str, *, missing_ok: bool) -> list[_Line]:
    try:
        return _read(path)[1]
    except ConfigError:
        if missing_ok and not os.path.lexists(path):
            return []
        raise


# -- writing ------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: str):
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _NEW_FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"{lock_path}: cannot open lock file: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_lines(path: str, lines: list[_Line]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        previous = os.stat(path)
    except FileNotFoundError:
        previous = None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".passwd.")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create a file in {directory}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            if previous is None:
                os.fchmod(stream.fileno(), _NEW_FILE_MODE)
            else:
                # Keep who may read it (the controller may run as its own user
                # or group), but never let the hashes become world-readable.
                os.fchmod(stream.fileno(), stat.S_IMODE(previous.st_mode) & 0o660)
                with contextlib.suppress(PermissionError):
                    os.fchown(stream.fileno(), previous.st_uid, previous.st_gid)
            stream.write("".join(line.text + "\n" for line in lines))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_path, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        if isinstance(exc, OSError):
            raise ConfigError(f"{path}: cannot write password file: {exc.strerror}") from None
        raise


def _find(lines: list[_Line], username: str) -> int | None:
    for index, line in enumerate(lines):
        if line.entry is not None and line.entry.username == username:
            return index
    return None


def add_user(path, user, password, role=None, *, rounds: int = DEFAULT_ROUNDS) -> PasswdEntry:
    """Add ``user``; creates the file (mode 0600) if needed; refuses an existing user."""
    path = os.fspath(path)
    validate_username(user)
    validate_role(role)
    password_hash = hash_password(password, rounds)
    with _locked(path):
        lines = _read_lines(path, missing_ok=True)
        if _find(lines, user) is not None:
            raise InvalidRequest(f"user {user!r} already exists in {path}")
        entry = PasswdEntry(user, password_hash, role)
        lines.append(_Line(entry.to_line(), entry))
        _write_lines(path, lines)
    return entry


def set_password(path, user, password, *, rounds: int = DEFAULT_ROUNDS) -> PasswdEntry:
    """Replace the password of an existing ``user``, keeping its role."""
    path = os.fspath(path)
    validate_username(user)
    password_hash = hash_password(password, rounds)
    with _locked(path):
        lines = _read_lines(path, missing_ok=False)
        index = _find(lines, user)
        if index is None:
            raise InvalidRequest(f"no user {user!r} in {path}")
        entry = dataclasses.replace(lines[index].entry, password_hash=password_hash)
        lines[index] = _Line(entry.to_line(), entry)
        _write_lines(path, lines)
    return entry


def delete_user(path, user) -> None:
    """Remove ``user`` from the file."""
    path = os.fspath(path)
    validate_username(user)
    with _locked(path):
        lines = _read_lines(path, missing_ok=False)
        index = _find(lines, user)
        if index is None:
            raise InvalidRequest(f"no user {user!r} in {path}")
        del lines[index]
        _write_lines(path, lines)


__all__ = [
    "DEFAULT_PASSWD_FILE", "DEFAULT_ROUNDS", "MAX_PASSWORD_BYTES", "PasswdEntry",
    "USERNAME_PATTERN", "ROLE_PATTERN", "add_user", "check_password", "delete_user",
    "hash_password", "load", "load_if_changed", "set_password", "validate_role",
    "validate_username",
]

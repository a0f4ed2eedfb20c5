"""The queue: a spool directory the submit command writes and the daemon
reads (no inotify: the daemon polls it).

    queue_dir/new/<job id>.json     one job, written atomically by ``submit``
    queue_dir/cancel/<job id>       a cancellation request (empty file)
    state_dir/jobs.json             every job the daemon accepted, its state
    state_dir/status.json           what ``usher-batch status``/``report`` show

The owner of a job or cancel file is the file's owner (its uid), never what
the file says: anyone who may write the spool may submit, but only as
themselves. Everything in a job file is checked (``check_submission``).
All functions here block (file I/O): the daemon calls them in a thread.
"""

import json
import os
import stat
import pwd
import re
import secrets
import time

from usher.errors import InvalidRequest
from usher.persist import read_json, remove_leftovers, write_json_atomic

JOB_ID_RE = re.compile(r"^j[0-9a-f]{10}$")
LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ARG_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# A job file larger than this is not read.
MAX_JOB_FILE = 16 * 1024
MAX_ARGS = 16
MAX_ARG_VALUE = 1024
# Arguments the daemon itself sets on a job's VM: a job cannot override them.
RESERVED_ARGS = frozenset({"vcpus", "memory_mib", "guaranteed", "cluster", "count",
                           "affinity", "lease"})


def new_job_id():
    return "j" + secrets.token_hex(5)


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def check_submission(data, limits):
    """A job file's content -> the checked fields; InvalidRequest otherwise.
    ``limits``: an object with max_vcpus, max_memory_mib, max_walltime."""
    if not isinstance(data, dict):
        raise InvalidRequest("a job must be a JSON object")
    vcpus, memory, walltime = data.get("vcpus"), data.get("memory_mib"), data.get("walltime")
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= limits.max_vcpus:
        raise InvalidRequest(f"vcpus must be an integer from 1 to {limits.max_vcpus}")
    if (not isinstance(memory, int) or isinstance(memory, bool)
            or not 64 <= memory <= limits.max_memory_mib):
        raise InvalidRequest(f"memory_mib must be an integer from 64 to {limits.max_memory_mib}")
    if (not isinstance(walltime, (int, float)) or isinstance(walltime, bool)
            or not 0 < walltime <= limits.max_walltime):
        raise InvalidRequest(f"walltime must be a number of seconds, more than 0 and at most "
                             f"{limits.max_walltime:g}")
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not LABEL_RE.fullmatch(name)):
        raise InvalidRequest("name must be a DNS label (lower-case letters, digits, hyphens)")
    args = data.get("args") or {}
    if not isinstance(args, dict) or len(args) > MAX_ARGS:
        raise InvalidRequest(f"args must be an object of at most {MAX_ARGS} entries")
    for key, value in args.items():
        if not isinstance(key, str) or not ARG_KEY_RE.fullmatch(key):
            raise InvalidRequest(f"invalid argument name {key!r}")
        if key in RESERVED_ARGS:
            raise InvalidRequest(f"argument {key} is set by the batch daemon")
        if not isinstance(value, str) or len(value) > MAX_ARG_VALUE:
            raise InvalidRequest(f"argument {key}: a string of at most {MAX_ARG_VALUE} "
                                 "characters")
    return {"vcpus": vcpus, "memory_mib": memory, "walltime": float(walltime),
            "name": name, "args": dict(args)}


class Spool:
    def __init__(self, queue_dir, state_dir=None):
        self.queue_dir = queue_dir
        self.new_dir = os.path.join(queue_dir, "new")
        self.cancel_dir = os.path.join(queue_dir, "cancel")
        self.state_dir = state_dir

    # -- the submit command's side ----------------------------------------------

    def submit(self, fields, limits):
        """Write a new job file -> its job id (the caller's uid owns it)."""
        checked = check_submission(fields, limits)
        job_id = new_job_id()
        path = os.path.join(self.new_dir, f"{job_id}.json")
        _write_new(path, dict(checked, submitted=time.time()))
        return job_id

    def request_cancel(self, job_id):
        if not JOB_ID_RE.fullmatch(job_id or ""):
            raise InvalidRequest(f"not a job id: {job_id!r}")
        _write_new(os.path.join(self.cancel_dir, job_id), None)

    # -- the daemon's side ---------------------------------------------------------

    def prepare(self):
        for directory in (self.new_dir, self.cancel_dir):
            os.makedirs(directory, exist_ok=True)
        if self.state_dir:
            os.makedirs(self.state_dir, exist_ok=True)
            for name in ("jobs.json", "status.json", "power.json"):
                remove_leftovers(os.path.join(self.state_dir, name))

    def take_new(self, limits):
        """Read and remove the new job files -> ([(job id, uid, mtime, fields)],
        [(file name, why refused)]), oldest file first."""
        accepted, refused = [], []
        for entry in _entries(self.new_dir):
            name = entry.name
            job_id = name[:-5] if name.endswith(".json") else None
            if name.startswith("."):
                continue                                 # a submit still writing
            try:
                if job_id is None or not JOB_ID_RE.fullmatch(job_id):
                    raise InvalidRequest("not a job file name")
                # Checked on the descriptor that is read: a file swapped for a
                # link or a FIFO after a stat would otherwise be followed, or
                # block the reading thread (and the daemon's loop) for good.
                data, info = _read_job_file(entry.path)
                fields = check_submission(data, limits)
                accepted.append((job_id, info.st_uid, info.st_mtime, fields))
            except (InvalidRequest, ValueError, OSError) as e:
                refused.append((name, str(e)))
            _unlink(entry.path)
        accepted.sort(key=lambda item: (item[2], item[0]))
        return accepted, refused

    def take_cancels(self):
        """-> [(job id, uid)] of the cancellation requests, removed."""
        found = []
        for entry in _entries(self.cancel_dir):
            if JOB_ID_RE.fullmatch(entry.name):
                try:
                    found.append((entry.name, entry.stat(follow_symlinks=False).st_uid))
                except OSError:
                    pass
            if not entry.name.startswith("."):
                _unlink(entry.path)
        return found

    def load(self, name, default):
        return read_json(os.path.join(self.state_dir, name), default)

    def save(self, name, data, public=False):
        """Write a state file; ``public`` ones (status.json) every user may read."""
        path = os.path.join(self.state_dir, name)
        write_json_atomic(path, data)
        if public:
            os.chmod(path, 0o644)

    def read_status(self):
        """-> the daemon's status.json (None before its first round)."""
        return read_json(os.path.join(self.state_dir, "status.json"), None)


def _entries(directory):
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return []


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_new(path, data):
    """Write through a dot-file and rename: the daemon never reads half a job."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if data is not None:
                json.dump(data, f)
        os.rename(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _read_job_file(path):
    """-> (the JSON of a job file, its fstat), refusing anything but a
    regular file of at most MAX_JOB_FILE bytes, never following a link and
    never blocking on a FIFO or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise InvalidRequest(f"cannot open it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JOB_FILE:
            raise InvalidRequest("not a regular file of at most 16 KiB")
        raw = f.read(MAX_JOB_FILE + 1)
    if len(raw) > MAX_JOB_FILE:
        raise InvalidRequest("not a regular file of at most 16 KiB")
    return json.loads(raw.decode("utf-8")), info

"""The site's power hooks (``power_off_command``/``power_on_command``): an
argv with ``{lnm}`` and ``{hostname}`` filled in, run without a shell in a
thread of the daemon's pool (never on the reactor), killed after
``hook_timeout`` seconds. Exit status 0 is success."""

import dataclasses
import subprocess

from twisted.internet import threads

# At most this much of a hook's output is kept (for the log).
MAX_OUTPUT = 2000


@dataclasses.dataclass
class HookResult:
    ok: bool
    detail: str


def fill(argv, **fields):
    return [word.format(**fields) for word in argv]


def run_argv(argv, timeout):
    """Blocking: run ``argv`` -> HookResult."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return HookResult(False, f"{argv[0]}: no exit within {timeout:g} s (killed)")
    except OSError as e:
        return HookResult(False, f"{argv[0]}: cannot run it: {e.strerror or e}")
    output = (done.stdout + done.stderr).decode("utf-8", "replace").strip()[:MAX_OUTPUT]
    if done.returncode != 0:
        return HookResult(False, f"{argv[0]} exited with status {done.returncode}"
                                 + (f": {output}" if output else ""))
    return HookResult(True, output)


class HookRunner:
    def __init__(self, reactor, pool, timeout):
        self.reactor = reactor
        self.pool = pool
        self.timeout = timeout

    def run(self, argv, **fields):
        """-> Deferred of HookResult."""
        return threads.deferToThreadPool(self.reactor, self.pool, run_argv,
                                         fill(argv, **fields), self.timeout)

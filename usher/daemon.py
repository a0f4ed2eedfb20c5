"""Running an Usher daemon in the foreground: logging, pid file, signals.

Init scripts and systemd units run the daemons in the foreground and let the
service manager background them, so there is no double-fork here.
"""

import argparse
import gc
import os
import stat
import sys

from twisted.application import service
from twisted.logger import (FileLogObserver, FilteringLogObserver, LogLevel,
                            LogLevelFilterPredicate, Logger, formatEventAsClassicLogText,
                            globalLogBeginner)

from usher.errors import ConfigError

log = Logger()


def argument_parser(prog, description, component):
    """The options every Usher daemon takes: --config, --isolated, --version."""
    from usher import __version__
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="read this configuration file last (may be repeated)")
    parser.add_argument("--isolated", action="store_true",
                        help="read only the --config files, not /etc/usher, ~/.usher or "
                             f"${component.env_var}")
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    return parser


# Longest log event written (characters): whatever a peer manages to get
# into an event (an exception message repeating what it sent …) is cut
# there. Room for a deep traceback.
MAX_LOG_EVENT = 16 * 1024
# Log files are created readable by the owner and its group only.
LOG_FILE_MODE = 0o640


def bounded_event_text(event, limit=MAX_LOG_EVENT):
    """An event formatted as Twisted's text log does, cut to ``limit``
    characters (or None when there is nothing to write)."""
    text = formatEventAsClassicLogText(event)
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters cut]\n"


def open_log_file(path):
    """Append to ``path``, creating it 0640 (never wider: an existing file
    loses any permission for others)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_FILE_MODE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & ~LOG_FILE_MODE:
            os.fchmod(fd, mode & LOG_FILE_MODE)
    except OSError:
        pass      # not ours to change: keep what the administrator set
    return open(fd, "a", buffering=1, encoding="utf-8")


def start_logging(log_file, level):
    """Log at ``level`` and above to ``log_file`` (standard output if None),
    every event at most MAX_LOG_EVENT characters; a file that cannot be
    opened is a ConfigError naming it."""
    try:
        stream = open_log_file(log_file) if log_file else sys.stdout
    except OSError as e:
        raise ConfigError(f"log_file {log_file}: cannot open it: "
                          f"{e.strerror or e.__class__.__name__}") from None
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    observer = FilteringLogObserver(FileLogObserver(stream, bounded_event_text), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def settle_heap():
    """Once a daemon has started: move every object that exists (modules,
    classes, configuration, a fleet's LNMs and their connections) out of the
    garbage collector's way. A full collection over the heap of hundreds of
    LNMs in one process stalls the reactor for 0.2-0.4 s, and what start-up
    built is not garbage; objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def write_pid_file(path):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(path, encoding="ascii") as f:
            old = int(f.read().strip() or 0)
    except (OSError, ValueError):
        old = 0
    if old and old != os.getpid():
        try:
            os.kill(old, 0)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise SystemExit(f"pid file {path} names running process {old}")
        else:
            raise SystemExit(f"pid file {path} names running process {old}")
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")


def remove_pid_file(path):
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def run(reactor, root, *, name, pid_file=None, on_running=None):
    """Start ``root`` (a MultiService) and run the reactor until a signal;
    returns the process exit code."""
    write_pid_file(pid_file)
    exit_code = [0]
    started = [False]

    def startup():
        try:
            root.startService()
        except Exception as e:
            log.critical("{name} could not start: {error}", name=name, error=e)
            exit_code[0] = 1
            reactor.stop()
            return
        started[0] = True
        log.info("{name} running (pid {pid})", name=name, pid=os.getpid())
        if on_running is not None:
            on_running()

    reactor.callWhenRunning(startup)
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: started[0] and root.stopService())
    try:
        reactor.run()
    finally:
        remove_pid_file(pid_file)
    return exit_code[0]


class ThreadPoolService(service.Service):
    """Runs a ThreadPool for as long as the service runs."""

    def __init__(self, pool):
        self.pool = pool

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        # Joins the workers: only called once nothing submits work any more.
        self.pool.stop()

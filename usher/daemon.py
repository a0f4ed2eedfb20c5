"""Running an Usher daemon in the foreground: the one ``main`` of usherctrl,
usherlnm and plusher (options, configuration, logging, pid file, signals),
and what happens when a daemon cannot start.

Init scripts and systemd units run the daemons in the foreground and let the
service manager background them, so there is no double-fork here. A daemon
says it is up (``--ready-file``, and systemd's ``NOTIFY_SOCKET`` for units
of ``Type=notify``) only once it serves; one that cannot start logs why and
exits at once, non-zero: 1, or 2 when the reason is its configuration.
"""

import argparse
import dataclasses
import gc
import os
import socket
import stat
import sys
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, error
from twisted.logger import (FileLogObserver, FilteringLogObserver, LogLevel,
                            LogLevelFilterPredicate, Logger, formatEventAsClassicLogText,
                            globalLogBeginner)
from twisted.python.failure import Failure

from usher.errors import ConfigError, UsherError

log = Logger()

# Exit codes of every daemon.
EXIT_STOPPED = 0        # stopped by a signal after running
EXIT_CANNOT_START = 1   # start-up failed (a busy port, an unreachable hypervisor ...)
EXIT_CONFIG = 2         # an invalid configuration: starting again cannot help


def argument_parser(prog, description, component):
    """The options every Usher daemon takes: --config, --isolated,
    --ready-file, --version."""
    from usher import __version__
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="read this configuration file last (may be repeated)")
    parser.add_argument("--isolated", action="store_true",
                        help="read only the --config files, not /etc/usher, ~/.usher or "
                             f"${component.env_var}")
    parser.add_argument("--ready-file", metavar="FILE",
                        help="write this process's id to FILE once the daemon is up, and "
                             "remove it at exit (the init scripts wait for it)")
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


def remove_file(path):
    """Remove the pid file or ready file ``path`` (None: nothing), if it is there."""
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


@dataclasses.dataclass
class Daemon:
    """What a daemon's ``build`` step makes of its configuration."""

    # Started once the reactor runs, stopped on SIGTERM or SIGINT.
    root: service.IService
    # Names the daemon in log lines ("usherlnm lnm7").
    name: str
    # Called once ``root`` has started: a Deferred that fires when the
    # daemon is up and fails with the reason it cannot start (None: it is
    # up once ``root`` has started).
    ready: Callable[[], defer.Deferred] | None = None
    # Called once the daemon is up.
    on_ready: Callable[[], None] | None = None


def main(argv, *, prog, description, component, build, add_arguments=None,
         check_options=None):
    """The whole ``main()`` of an Usher daemon -> its exit code.

    Parses the common options (``argument_parser``) and those
    ``add_arguments(parser)`` adds (``check_options(parser, options)`` may
    refuse them with ``parser.error``), loads ``component``'s configuration,
    calls ``build(options, config, reactor)`` -> ``Daemon``, starts logging
    as the configuration's ``log_file`` and ``log_level`` say, and runs. A
    ``ConfigError`` (or ``OSError``) until then is a configuration error:
    one line on standard error, exit code 2.
    """
    parser = argument_parser(prog, description, component)
    if add_arguments is not None:
        add_arguments(parser)
    options = parser.parse_args(argv)
    if check_options is not None:
        check_options(parser, options)

    from twisted.internet import reactor

    from usher.config import load_config
    try:
        config = load_config(component, extra_files=options.config,
                             isolated=options.isolated)
        daemon = build(options, config, reactor)
        section = config[component.name]
        start_logging(section["log_file"], section["log_level"])
    except (ConfigError, OSError) as e:   # OSError: e.g. a state_dir it cannot create
        print(f"{prog}: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return run(reactor, daemon, pid_file=section["pid_file"], ready_file=options.ready_file,
               # Standard output is the log otherwise: say it once.
               tell_stderr=bool(section["log_file"]))


def _expected(failure):
    """A start-up failure of the kinds a site meets (a bad configuration, a
    busy port, a refused connection), which needs no traceback."""
    return failure.check(UsherError, ConfigError, error.CannotListenError, OSError) is not None


def run(reactor, daemon, *, pid_file=None, ready_file=None, tell_stderr=False):
    """Start ``daemon.root`` once the reactor runs and run the reactor until
    a signal stops it -> ``EXIT_STOPPED``; or until the start fails (raises,
    or ``daemon.ready`` fails): then log why, stop whatever did start and
    return at once with ``EXIT_CANNOT_START`` (``EXIT_CONFIG`` when why is a
    ``ConfigError``). ``tell_stderr``: write why to standard error too."""
    write_pid_file(pid_file)
    root = daemon.root
    state = {"code": EXIT_STOPPED, "started": False, "half_started": False,
             "stopping": False}

    def cannot_start(failure):
        message = failure.getErrorMessage() or failure.type.__name__
        if _expected(failure):
            log.critical("{name} could not start: {error}", name=daemon.name, error=message)
        else:
            log.failure("{name} could not start: {error}", failure, LogLevel.critical,
                        name=daemon.name, error=message)
        if tell_stderr:
            print(f"{daemon.name}: could not start: {message}", file=sys.stderr, flush=True)
        state["code"] = EXIT_CONFIG if failure.check(ConfigError) else EXIT_CANNOT_START
        try:
            reactor.stop()
        except error.ReactorNotRunning:
            pass        # already stopping (a signal came first)

    def up(_):
        if state["stopping"]:
            return      # a signal came while it started: it is not up, it is going
        announce_ready(ready_file)
        if daemon.on_ready is not None:
            daemon.on_ready()

    def startup():
        try:
            root.startService()
        except Exception:
            state["half_started"] = True
            cannot_start(Failure())
            return
        state["started"] = True
        log.info("{name} running (pid {pid})", name=daemon.name, pid=os.getpid())
        ready = defer.maybeDeferred(daemon.ready) if daemon.ready is not None \
            else defer.succeed(None)
        ready.addCallbacks(up, cannot_start)
        ready.addErrback(lambda f: log.failure("{name}: after it came up", f, name=daemon.name))

    def shutdown():
        state["stopping"] = True
        notify_service_manager(b"STOPPING=1")
        if state["half_started"]:
            return stop_half_started(root)
        if state["started"]:
            return root.stopService()
        return None

    reactor.callWhenRunning(startup)
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    try:
        reactor.run()
    finally:
        remove_file(ready_file)
        remove_file(pid_file)
    return state["code"]


def stop_half_started(root):
    """Stop what a ``startService`` that raised half-way left running: a
    MultiService's children that did start, in reverse order (its own
    ``stopService`` also stops those that never started, which may fail:
    a listener that never listened has nothing to stop). Their thread pools
    above all: a pool still running keeps the process from exiting."""
    if not isinstance(root, service.MultiService):
        return defer.maybeDeferred(root.stopService) if root.running else None
    service.Service.stopService(root)
    stops = []
    for child in reversed(list(root)):
        if child.running:
            stop = defer.maybeDeferred(child.stopService)
            stop.addErrback(lambda f, child=child: log.failure(
                "stopping {service} after a failed start", f, service=child))
            stops.append(stop)
    return defer.DeferredList(stops)


def announce_ready(ready_file):
    """Tell whoever started the daemon that it is up: ``ready_file`` (the
    init scripts), written whole with this process's id, and systemd."""
    if ready_file:
        temporary = f"{ready_file}.{os.getpid()}"
        try:
            with open(temporary, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(temporary, ready_file)
        except OSError as e:
            log.error("cannot write the ready file {path}: {error}", path=ready_file,
                      error=e.strerror or e)
    notify_service_manager(b"READY=1")


def notify_service_manager(message, environ=os.environ):
    """Send ``message`` (``b"READY=1"``, ``b"STOPPING=1"``) to systemd as
    sd_notify(3) does: one datagram to the socket ``$NOTIFY_SOCKET`` names
    (a path, or ``@name`` in the abstract namespace); nothing without it."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message, address)
    except OSError as e:
        log.warn("cannot notify the service manager ({message}): {error}",
                 message=message.decode(), error=e)


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

"""The ush program: its options, then the interactive shell (no command)
or one command run once, and the exit status (usher.errors.EXIT_STATUSES:
0 success, 1 failed, 2 usage or configuration, 3 connection or outcome
unknown, 4 nothing matched, 130 interrupted). The console script ``ush`` is
``main``.

Everything that can be checked locally is checked before a password is
asked for: the command line, the configuration, the CA file, a
password_file."""

import argparse
import getpass
import signal
import sys
import threading

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from usher.errors import CONFIG_ERROR, EXIT_INTERRUPTED, USAGE, ConfigError

from .console import Console, PasswordPrompter, save_history, setup_readline
from .format import error_json
from .help_text import exit_status_summary
from .outcome import EXIT_OK, EXIT_USAGE
from .settings import load_settings
from .shell import CLOSE_TIMEOUT, Shell


def version():
    try:
        from usher import __version__
        return __version__
    except ImportError:
        return "unknown"


def banner():
    return (f"Usher Shell {version()}\n"
            "Type '?' or 'help' for help\n"
            "Use: help <command> for command specific help")


def tls_name_for(host, settings):
    from usher.controllers import parse_controllers
    from usher.errors import ConfigError

    """The controller_tls_name for ``host``: the configured one(s) for the
    configured list; for a host given to ``connect``, the name configured
    for that entry of the list (or the single name), else its own name."""
    names = settings.controller_tls_name
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    if not names or len(names) == 1 or host == settings.controller_host:
        return settings.controller_tls_name
    try:
        configured = parse_controllers(settings.controller_host,
                                       settings.controller_port or 7390, names)
    except ConfigError:
        return None
    for controller in configured:
        if controller.host == host:
            return controller.tls_name
    return None


def default_client_factory(reactor, settings):
    """The real client's factory; checks the files the client will need
    first (raises ConfigError)."""
    settings.load_files()

    def factory(host, port, username, password):
        from usher.client import UsherClient
        return UsherClient(reactor, host, port, ca_file=settings.ssl_ca_file,
                           tls_name=tls_name_for(host, settings), username=username,
                           password=password, clusters=settings.clusters or None,
                           timeout=settings.call_timeout)
    return factory


def run_interactive(settings, reactor, client_factory=None):
    """The interactive shell: reactor in a background thread, terminal here."""
    from twisted.internet import threads
    console = Console(reactor)
    shell = Shell(client_factory or default_client_factory(reactor, settings), settings,
                  out=console, prompter=console, clock=reactor,
                  wait_for_results=not console.interactive)
    if console.interactive:
        shell.confirmer = console
    # top is live at the prompt too: Enter or Ctrl-C gives the prompt back.
    shell.live_output = shell.at_prompt = console.interactive
    readline = setup_readline(settings.history_file, shell) if console.interactive else None
    console._readline = readline
    reactor_thread = threading.Thread(target=reactor.run,
                                      kwargs={"installSignalHandlers": False},
                                      name="ush-reactor", daemon=True)
    start_without_sigint(reactor_thread)
    if console.interactive:
        console.write(banner() + "\n")
    try:
        console.loop(shell)
    finally:
        save_history(readline, settings.history_file)
        try:
            threads.blockingCallFromThread(reactor, shell.close)
        except Exception:
            pass
        reactor.callFromThread(reactor.stop)
        reactor_thread.join(CLOSE_TIMEOUT)
    return EXIT_OK


def start_without_sigint(thread):
    """Start ``thread`` (and the threads it starts: they inherit its signal
    mask) with SIGINT blocked, so that Ctrl-C always reaches the main
    thread. The kernel gives a process-wide signal to any thread that does
    not block it; one taken by the reactor thread would leave readline, in
    the main thread, waiting for the next key instead of seeing Ctrl-C."""
    if not hasattr(signal, "pthread_sigmask"):
        thread.start()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _wait_for(reactor, d, on_interrupt=None):
    """Run the reactor until ``d`` fires (not at all if it has) -> its result,
    or 130 after Ctrl-C.

    SIGINT is ush's own here, not Twisted's: it calls ``on_interrupt`` (the
    shell falls silent, so that the connections closing as the reactor stops
    print no false "connection lost") and stops the reactor once; a command
    finishing in the same turn does not stop it a second time."""
    box = []
    started, stopping, interrupted = [], [], []

    def stop_once():
        if started and not stopping:
            stopping.append(True)
            reactor.stop()

    def on_start():
        started.append(True)
        if box or interrupted:
            stop_once()

    def done(result):
        box.append(result)
        stop_once()

    def interrupt():
        if on_interrupt is not None:
            on_interrupt()
        stop_once()

    def on_sigint(signum, frame):
        interrupted.append(True)
        reactor.callFromThread(interrupt)

    d.addBoth(done)
    if not box:
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            reactor.callWhenRunning(on_start)
            reactor.run(installSignalHandlers=False)
        finally:
            signal.signal(signal.SIGINT, previous)
    if interrupted or not box:
        return EXIT_INTERRUPTED
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def command_line_parser():
    parser = argparse.ArgumentParser(
        prog="ush", description="The Usher shell. Without a command, an interactive "
        "shell; with one, run it and exit (type 'ush help' for the commands).",
        epilog=exit_status_summary())
    parser.add_argument("--config", metavar="FILE", action="append", default=[],
                        help="read this configuration file after the usual ones (may be "
                             "repeated)")
    parser.add_argument("--isolated", action="store_true",
                        help="read only the --config files, not /etc/usher, ~/.usher or "
                             "$USHER_USH_CONFIG")
    parser.add_argument("--json", action="store_true",
                        help="print results as JSON (one-shot mode)")
    parser.add_argument("--no-notices", action="store_true",
                        help="start the interactive shell with [notice] lines off "
                        "('notices on' brings them back)")
    parser.add_argument("--version", action="version", version=f"ush {version()}")
    parser.add_argument("--completion", choices=("bash", "zsh"), metavar="SHELL",
                        help="print the shell completion script for SHELL (bash, zsh) and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="COMMAND [ARGUMENTS...]")
    return parser


def run(argv=None, *, stdout=None, stderr=None, settings_loader=load_settings,
        client_factory=None, reactor=None, getpass_fn=getpass.getpass):
    """The whole program; -> exit status. Arguments exist for tests."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    options = command_line_parser().parse_args(argv)
    if options.completion:
        from usher.completion import script, ush_parser
        stdout.write(script(ush_parser(), options.completion))
        return EXIT_OK

    def fail(message, code):
        if options.json:
            stdout.write(error_json(message, code) + "\n")
        else:
            stderr.write(f"ush: {message}\n")
        return EXIT_USAGE

    if not options.command and options.json:
        return fail("--json needs a command (one-shot mode)", USAGE)
    try:
        settings = settings_loader(options.config, isolated=options.isolated)
        if reactor is None:
            from twisted.internet import reactor
        # Help needs no connection (nor its files).
        if client_factory is None and options.command[:1] != ["help"] and not (
                {"-h", "--help"} & set(options.command)):
            client_factory = default_client_factory(reactor, settings)
    except ConfigError as exc:
        return fail(str(exc), CONFIG_ERROR)
    if options.no_notices:
        settings.notices = False
    if not options.command:
        return run_interactive(settings, reactor, client_factory)
    shell = Shell(client_factory, settings,
                  out=stdout, err=stderr, prompter=PasswordPrompter(getpass_fn),
                  clock=reactor, json_output=options.json)
    shell.live_output = bool(getattr(stdout, "isatty", lambda: False)())
    # Starts synchronously: a password prompt happens before the reactor runs.
    return _wait_for(reactor, Deferred.fromCoroutine(shell.run_once(options.command)),
                     on_interrupt=shell.interrupt)


def main():
    try:
        sys.exit(run())
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)

"""Interactive ush's terminal: readline and getpass in the main thread, the
Shell on the reactor thread.

Readline and getpass need the main thread (that is where Python delivers
Ctrl-C as KeyboardInterrupt, which clears the line), so the reactor runs in
a background thread and the two meet through ``callFromThread`` and a queue.
Also the password prompter of one-shot mode, and readline's history and
completion.
"""

import getpass
import os
import queue
import signal
import sys
import threading

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .outcome import Cancelled

log = Logger()


NO_TERMINAL = ("no password configured and no terminal to ask for one: set password_file "
               "(a file only you can read) or password in the [ush] section")


def has_terminal():
    """Can getpass ask on a terminal (the process has a controlling one)?"""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def read_password(getpass_fn, prompt):
    """The password typed at ``prompt``; Cancelled at end of input (Ctrl-D),
    or at once if there is no terminal (getpass would read the password
    from standard input, with a GetPassWarning: never what a script means).
    Ctrl-C is KeyboardInterrupt (one-shot ush exits 130)."""
    if getpass_fn is getpass.getpass and not has_terminal():
        raise Cancelled(NO_TERMINAL)
    try:
        return getpass_fn(prompt)
    except EOFError:
        raise Cancelled() from None


class PasswordPrompter:
    """Asks with getpass right away; for one-shot mode, before the reactor
    runs (so the blocking prompt stops nothing)."""

    def __init__(self, getpass_fn=getpass.getpass):
        self._getpass = getpass_fn

    def ask_password(self, prompt):
        # Ctrl-C at the prompt is KeyboardInterrupt (ush exits 130) even
        # when the prompt comes once the reactor runs, under one-shot ush's
        # own SIGINT handler: that one only stops the reactor, which the
        # blocking prompt holds, and the line typed next would be taken as
        # the password.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.default_int_handler) if in_main else None
        try:
            return defer.succeed(read_password(self._getpass, prompt))
        except Cancelled as exc:
            return defer.fail(exc)
        finally:
            if in_main and previous is not None:
                signal.signal(signal.SIGINT, previous)


class Console:
    """Interactive mode's terminal: readline and getpass in the main thread,
    the Shell on the reactor thread.

    The main thread reads a line, hands it to the reactor thread and waits
    for the shell to ask for the next one (or for a password, or to stop).
    Output produced while a prompt is showing (results, notices) is written
    over the prompt line, which is then drawn again with what was typed so
    far.
    """

    def __init__(self, reactor, *, stdout=None, input_fn=input, getpass_fn=getpass.getpass,
                 interactive=None, readline_module=None):
        self._reactor = reactor
        self._stdout = stdout if stdout is not None else sys.stdout
        self._input = input_fn
        self._getpass = getpass_fn
        self.interactive = (sys.stdin.isatty() and self._stdout.isatty()
                            if interactive is None else interactive)
        self._readline = readline_module
        self._lock = threading.Lock()
        self._requests = queue.Queue()
        self._reading_prompt = None
        # The prompt being read is a question (confirm), not the shell's.
        self._asking = False
        self.shell = None

    # Called on any thread.
    def write(self, text):
        with self._lock:
            prompt = self._reading_prompt
            if prompt is not None and self.interactive:
                typed = self._readline.get_line_buffer() if self._readline else ""
                current = (self.shell.prompt if self.shell is not None and not self._asking
                           else prompt)
                self._stdout.write("\r\x1b[K" + text + current + typed)
            else:
                self._stdout.write(text)
            self._stdout.flush()

    # Called on the reactor thread by the Shell.
    def ask_password(self, prompt):
        d = Deferred()
        self._requests.put(("password", prompt, d))
        return d

    def confirm(self, prompt):
        """Ask a yes/no question on the terminal -> Deferred[bool] (only "y"
        or "yes" is yes; Ctrl-C or end of input is no)."""
        d = Deferred()
        self._requests.put(("confirm", prompt, d))
        return d

    def _dispatch(self, line):
        d = self.shell.handle_line(line)

        def next_step(keep_going):
            self._requests.put(("read",) if keep_going else ("stop",))

        def crashed(failure):
            log.failure("ush command failed", failure)
            self.write(f"internal error: {failure.getErrorMessage()}\n")
            self._requests.put(("read",))
        d.addCallbacks(next_step, crashed)

    def _read_line(self):
        prompt = self.shell.prompt if self.interactive else ""
        with self._lock:
            self._reading_prompt = prompt
        try:
            return self._input(prompt)
        finally:
            with self._lock:
                self._reading_prompt = None

    def _confirm(self, prompt, d):
        with self._lock:
            self._reading_prompt = prompt
            self._asking = True
        try:
            answer = self._input(prompt)
        except (EOFError, KeyboardInterrupt):
            self.write("\n")
            answer = ""
        finally:
            with self._lock:
                self._reading_prompt = None
                self._asking = False
        if answer and self._readline is not None:
            # The answer is no command: keep it out of the history.
            length = self._readline.get_current_history_length()
            if length:
                self._readline.remove_history_item(length - 1)
        self._reactor.callFromThread(d.callback, answer.strip().lower() in ("y", "yes"))

    def _ask_password(self, prompt, d):
        try:
            try:
                password = read_password(self._getpass, prompt)
            except KeyboardInterrupt:       # at the prompt: gives up this connect
                raise Cancelled() from None
        except Cancelled as exc:
            if not exc.args:
                self.write("\n")
            self._reactor.callFromThread(d.errback, Failure(exc))
        else:
            self._reactor.callFromThread(d.callback, password)

    def loop(self, shell):
        """Read and dispatch lines until quit/EOF; runs in the main thread."""
        self.shell = shell
        self._requests.put(("read",))
        while True:
            try:
                request = self._requests.get()
            except KeyboardInterrupt:
                self.write("\n")
                if self.shell.leaving:
                    # Leaving with commands pending: leave at once.
                    return
                # Between a line and the next prompt: as at the prompt, it
                # ends a live view, and the shell goes on.
                self._reactor.callFromThread(self.shell.stop_live_views)
                continue
            if request[0] == "stop":
                return
            if request[0] == "password":
                self._ask_password(request[1], request[2])
                continue
            if request[0] == "confirm":
                self._confirm(request[1], request[2])
                continue
            try:
                line = self._read_line()
            except KeyboardInterrupt:
                self.write("\n")
                # Ctrl-C also ends a live view (top) and gives the prompt back.
                self._reactor.callFromThread(self.shell.stop_live_views)
                self._requests.put(("read",))
                continue
            except EOFError:
                if self.interactive:
                    self.write("\n")
                line = None
            self._reactor.callFromThread(self._dispatch, line)


def setup_readline(history_file, shell):
    try:
        import readline
    except ImportError:
        return None
    if history_file:
        try:
            readline.read_history_file(history_file)
        except OSError:
            pass
    readline.set_history_length(1000)

    def completer(text, state):
        try:
            line = readline.get_line_buffer()[:readline.get_begidx()]
            matches = shell.complete(text, line)
        except Exception:
            return None
        return matches[state] if state < len(matches) else None
    readline.set_completer(completer)
    readline.set_completer_delims(" \t")
    readline.parse_and_bind("tab: complete")
    return readline


def save_history(readline, history_file):
    if readline is None or not history_file:
        return
    try:
        directory = os.path.dirname(history_file)
        if directory:
            os.makedirs(directory, exist_ok=True)
        readline.write_history_file(history_file)
    except OSError as exc:
        sys.stderr.write(f"ush: cannot save history to {history_file}: {exc}\n")

"""ush's session commands: connect, disconnect, reconnect, help, notices, quit.

The shell owns the session itself (the client, its callbacks, the notices);
these handlers check what the user typed, ask for a password when needed,
and word the outcome."""

from usher.cliargs import UsageError

from . import help_text
from .outcome import LEAVE, Call, Outcome


def parse_target(target, settings):
    """``[user@]host[:port]`` -> (user or None, host, port), falling back to
    the configuration: with no target, its controller_host (one or a list
    of controllers, tried in turn) and controller_port."""
    user, host, port = None, settings.controller_host, settings.controller_port
    if target:
        if "@" in target:
            user, _, target = target.rpartition("@")
            if not user:
                raise UsageError("empty user name before '@'", "connect")
        if target.startswith("["):  # [ipv6]:port
            inside, bracket, rest = target[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise UsageError(f"malformed address {target!r}", "connect")
            host, port_text = inside, rest[1:] or None
        else:
            host, colon, port_text = target.partition(":")
            port_text = port_text if colon else None
        if port_text is not None:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise UsageError(f"invalid port {port_text!r}", "connect")
            port = int(port_text)
        if not host:
            raise UsageError("missing host name", "connect")
    if not host:
        raise UsageError("no controller host: give one ('connect HOST') or set "
                         "controller_host in the [ush] section", "connect")
    if not port:
        raise UsageError("no controller port: give one ('connect HOST:PORT') or set "
                         "controller_port in the [ush] section", "connect")
    return user, host, port


async def cmd_help(shell, args):
    topic = args.topic
    if not topic:
        text = help_text.overview()
    else:
        try:
            text = help_text.render(topic)
        except KeyError:
            raise UsageError(f"no help on {topic!r}; type 'help' for the list of "
                             "commands and topics", "help") from None
    return Outcome(text, {"help": text})


async def cmd_connect(shell, args):
    if shell.connected:
        raise UsageError(f"already connected as {shell.client.user}; use 'disconnect' "
                         "first", "connect")
    user, host, port = parse_target(args.target, shell.settings)
    configured_user = shell.settings.login_name
    username = user or configured_user
    password = shell.settings.password if username == configured_user else None
    if password is None:
        if shell.prompter is None:
            raise UsageError("no password configured and no terminal to ask for one",
                             "connect")
        password = await shell.prompter.ask_password("Password: ")
    return Call(lambda: _connected_after(shell.open_session(
        host=host, port=port, username=username, password=password)))


async def _connected_after(login):
    info = await login
    return Outcome("Connected", dict(info or {}))


def _session_client(shell, command, missing):
    """The shell's client, connected or not; UsageError ``missing`` if none."""
    if shell.client is None:
        raise UsageError(missing, command)
    return shell.client


async def cmd_disconnect(shell, args):
    client = _session_client(shell, "disconnect", "not connected")

    async def disconnect():
        await shell.end_session(client)
        return Outcome("Disconnected", {"disconnected": True})
    return Call(disconnect)


async def cmd_reconnect(shell, args):
    client = _session_client(shell, "reconnect", "never connected; use 'connect'")
    return Call(lambda: _connected_after(shell.renew_session(client)))


async def cmd_notices(shell, args):
    if args.mode not in (None, "on", "off"):
        raise UsageError(f"say on or off, not {args.mode!r}", "notices")
    if args.mode is not None:
        shell.show_notices = args.mode == "on"
    state = "on" if shell.show_notices else "off"
    return Outcome(f"Notices are {state}.", {"notices": state})


async def cmd_quit(shell, args):
    return LEAVE


def register(declare):
    declare("connect", cmd_connect, remote=False).add_argument("target", nargs="?")
    declare("disconnect", cmd_disconnect, remote=False, interactive_only=True)
    declare("reconnect", cmd_reconnect, remote=False, interactive_only=True)
    declare("help", cmd_help, remote=False).add_argument("topic", nargs="?")
    declare("notices", cmd_notices, remote=False, interactive_only=True).add_argument(
        "mode", nargs="?", metavar="on|off")
    declare("quit", cmd_quit, remote=False, interactive_only=True)

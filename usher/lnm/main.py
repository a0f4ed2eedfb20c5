"""usherlnm: an Usher local node manager.

Runs in the foreground (init scripts and service managers background it):
logs with twisted.logger to stdout or ``log_file``, writes ``pid_file``, and
stops cleanly on SIGTERM or SIGINT, detaching from the controller and waiting
for operations in flight. Exit codes: 0 after a clean stop, 1 when the node
could not start (e.g. the hypervisor is unreachable), 2 for an invalid
configuration.
"""

import argparse
import sys

from usher import __version__
from usher.errors import ConfigError
from usher.protocol import MAX_FIELD


def main(argv=None):
    parser = argparse.ArgumentParser(prog="usherlnm",
                                     description="The Usher local node manager.")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="read this configuration file last (may be repeated)")
    parser.add_argument("--isolated", action="store_true",
                        help="read only the --config files, not /etc/usher, ~/.usher or "
                             "$USHER_LNM_CONFIG")
    parser.add_argument("--name", help="the LNM's name (default: [lnm] name, else the "
                                       "common name of its certificate)")
    parser.add_argument("--version", action="version", version=f"usherlnm {__version__}")
    options = parser.parse_args(argv)

    from twisted.internet import reactor

    from usher import daemon, settings
    from usher.config import load_config
    from usher.lnm.service import make_service

    try:
        config = load_config(settings.LNM, extra_files=options.config,
                             isolated=options.isolated)
        if options.name is not None:
            name = options.name.strip()
            if not name or len(name) > MAX_FIELD or not name.isprintable():
                raise ConfigError(f"--name: invalid LNM name {options.name!r}")
            config["lnm"]["name"] = name
        root = make_service(config, reactor)
    except ConfigError as e:
        print(f"usherlnm: configuration error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. state_dir not writable
        print(f"usherlnm: configuration error: {e}", file=sys.stderr)
        return 2
    lnm = config["lnm"]
    try:
        daemon.start_logging(lnm["log_file"], lnm["log_level"])
    except OSError as e:
        print(f"usherlnm: configuration error: cannot open log file: {e}", file=sys.stderr)
        return 2

    failed = []

    def watch_start():
        def cannot_start(failure):
            # LNMService has logged why; exit non-zero for the service manager.
            failed.append(failure)
            reactor.stop()

        # The link logs every attach ("... attached to the controller at ...").
        root.ready.addErrback(cannot_start)

    code = daemon.run(reactor, root, name=f"usherlnm {root.name}",
                      pid_file=lnm["pid_file"], on_running=watch_start)
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())

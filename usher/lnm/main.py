"""usherlnm: an Usher local node manager.

Runs in the foreground (init scripts and service managers background it):
logs with twisted.logger to stdout or ``log_file``, writes ``pid_file``, and
stops cleanly on SIGTERM or SIGINT, detaching from the controller and waiting
for operations in flight. Exit codes: 0 after a clean stop, 1 when the node
could not start (e.g. the hypervisor is unreachable), 2 for an invalid
configuration.
"""

import sys

from usher.errors import ConfigError
from usher.protocol import MAX_FIELD


def main(argv=None):
    from usher import daemon, settings
    parser = daemon.argument_parser("usherlnm", "The Usher local node manager.", settings.LNM)
    parser.add_argument("--name", help="the LNM's name (default: [lnm] name, else the "
                                       "common name of its certificate)")
    parser.add_argument("--fleet", type=int, metavar="N",
                        help="run N LNMs in this process, each on its own embedded test "
                             "host with its own certificate (see usher.lnm.fleet): for "
                             "benchmarks and trials at scale")
    parser.add_argument("--fleet-prefix", default="lnm", metavar="PREFIX",
                        help="fleet members are named PREFIX1 .. PREFIXN (default lnm)")
    parser.add_argument("--fleet-first", type=int, default=1, metavar="K",
                        help="number of the first fleet member (default 1)")
    parser.add_argument("--fleet-certs", metavar="DIR",
                        help="directory of the members' NAME_cert.pem and NAME_key.pem "
                             "(default: the directory of ssl_cert_file)")
    options = parser.parse_args(argv)
    if options.fleet is not None and (options.fleet < 1 or options.fleet_first < 0):
        parser.error("--fleet needs a positive number of LNMs (and --fleet-first >= 0)")
    if options.fleet is not None and options.name is not None:
        parser.error("--name names one LNM; a fleet's are --fleet-prefix and a number")

    from twisted.internet import reactor

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
        if options.fleet is not None:
            return _run_fleet(options, config, reactor)
        root = make_service(config, reactor)
        lnm = config["lnm"]
        daemon.start_logging(lnm["log_file"], lnm["log_level"])
    except ConfigError as e:
        print(f"usherlnm: configuration error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. state_dir not writable
        print(f"usherlnm: configuration error: {e}", file=sys.stderr)
        return 2

    failed = []

    def watch_start():
        def cannot_start(failure):
            # LNMService has logged why; exit non-zero for the service manager.
            failed.append(failure)
            reactor.stop()

        # The link logs every attach ("... attached to the controller at ...").
        root.ready.addCallbacks(lambda _: daemon.settle_heap(), cannot_start)

    code = daemon.run(reactor, root, name=f"usherlnm {root.name}",
                      pid_file=lnm["pid_file"], on_running=watch_start)
    return code or (1 if failed else 0)


def _run_fleet(options, config, reactor):
    """``--fleet N``: N LNMs in this process (usher.lnm.fleet)."""
    import os

    from twisted.internet import defer

    from usher import daemon
    from usher.lnm.fleet import Fleet

    lnm = config["lnm"]
    cert_dir = options.fleet_certs or os.path.dirname(os.path.abspath(lnm["ssl_cert_file"]))
    fleet = Fleet(config, reactor, cert_dir=cert_dir, prefix=options.fleet_prefix)
    daemon.start_logging(lnm["log_file"], lnm["log_level"])   # ConfigError: see main
    failed = []

    def add_members():
        numbers = range(options.fleet_first, options.fleet_first + options.fleet)

        def cannot_start(failure):
            # The fleet has logged which member and why.
            failed.append(failure)
            reactor.stop()

        defer.Deferred.fromCoroutine(fleet.add(numbers)).addCallbacks(
            lambda _: daemon.settle_heap(), cannot_start)

    code = daemon.run(reactor, fleet, name=f"usherlnm fleet of {options.fleet}",
                      pid_file=lnm["pid_file"], on_running=add_members)
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())

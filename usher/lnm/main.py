"""usherlnm: an Usher local node manager.

Runs in the foreground (init scripts and service managers background it):
logs with twisted.logger to stdout or ``log_file``, writes ``pid_file``, and
stops cleanly on SIGTERM or SIGINT, detaching from the controller and waiting
for operations in flight. It is up once its hypervisor is connected and its
first inventory taken. Exit codes (``usher.daemon``): 0 after a clean stop, 1
when the node could not start (e.g. the hypervisor is unreachable), 2 for an
invalid configuration.
"""

import sys

from usher.errors import ConfigError
from usher.protocol import MAX_FIELD


def add_arguments(parser):
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


def check_options(parser, options):
    if options.fleet is not None and (options.fleet < 1 or options.fleet_first < 0):
        parser.error("--fleet needs a positive number of LNMs (and --fleet-first >= 0)")
    if options.fleet is not None and options.name is not None:
        parser.error("--name names one LNM; a fleet's are --fleet-prefix and a number")


def build(options, config, reactor):
    from usher import daemon
    from usher.lnm.service import hypervisor_uri, make_service

    if options.name is not None:
        name = options.name.strip()
        if not name or len(name) > MAX_FIELD or not name.isprintable():
            raise ConfigError(f"--name: invalid LNM name {options.name!r}")
        config["lnm"]["name"] = name
    if options.fleet is not None:
        return _fleet(options, config, reactor)
    # Checked here to name the files: no hypervisor is a configuration error.
    hypervisor_uri(config["lnm"], where=_config_files(options))
    root = make_service(config, reactor)
    # LNMService has logged why it cannot start; the link logs every attach
    # ("... attached to the controller at ...").
    return daemon.Daemon(root, f"usherlnm {root.name}", ready=lambda: root.ready,
                         on_ready=daemon.settle_heap)


def _config_files(options):
    """The LNM configuration files read (for messages)."""
    import os

    from usher import settings
    from usher.config import config_files
    files = [path for path, _must in config_files(settings.LNM, options.config,
                                                   isolated=options.isolated)
             if os.path.exists(path)]
    return ", ".join(files) if files else "the LNM configuration (no file found)"


def _fleet(options, config, reactor):
    """``--fleet N``: N LNMs in this process (usher.lnm.fleet), up once every
    one is (the fleet logs which member could not start, and why)."""
    import os

    from twisted.internet import defer

    from usher import daemon
    from usher.lnm.fleet import Fleet

    lnm = config["lnm"]
    cert_dir = options.fleet_certs or os.path.dirname(os.path.abspath(lnm["ssl_cert_file"]))
    fleet = Fleet(config, reactor, cert_dir=cert_dir, prefix=options.fleet_prefix)
    numbers = range(options.fleet_first, options.fleet_first + options.fleet)
    return daemon.Daemon(fleet, f"usherlnm fleet of {options.fleet}",
                         ready=lambda: defer.Deferred.fromCoroutine(fleet.add(numbers)),
                         on_ready=daemon.settle_heap)


def main(argv=None):
    from usher import daemon, settings
    return daemon.main(argv, prog="usherlnm", description="The Usher local node manager.",
                       component=settings.LNM, build=build, add_arguments=add_arguments,
                       check_options=check_options)


if __name__ == "__main__":
    sys.exit(main())

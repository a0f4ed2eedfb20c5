"""usherctrl: the Usher controller."""

import argparse
import sys

from usher import __version__
from usher.errors import ConfigError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="usherctrl", description="The Usher controller.")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="read this configuration file last (may be repeated)")
    parser.add_argument("--isolated", action="store_true",
                        help="read only the --config files, not /etc/usher, ~/.usher or "
                             "$USHER_CTRL_CONFIG")
    parser.add_argument("--version", action="version", version=f"usherctrl {__version__}")
    options = parser.parse_args(argv)

    from twisted.internet import reactor

    from usher import daemon, settings
    from usher.config import load_config
    from usher.controller.service import make_service
    try:
        config = load_config(settings.CTRL, extra_files=options.config,
                             isolated=options.isolated)
        root, _controller = make_service(config, reactor)
    except ConfigError as e:
        print(f"usherctrl: configuration error: {e}", file=sys.stderr)
        return 2
    ctrl = config["ctrl"]
    daemon.start_logging(ctrl["log_file"], ctrl["log_level"])
    return daemon.run(reactor, root, name="usherctrl", pid_file=ctrl["pid_file"],
                      on_running=daemon.settle_heap)


if __name__ == "__main__":
    sys.exit(main())

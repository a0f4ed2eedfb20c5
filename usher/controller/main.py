"""usherctrl: the Usher controller."""

import sys

from usher.errors import ConfigError


def main(argv=None):
    from usher import daemon, settings
    options = daemon.argument_parser("usherctrl", "The Usher controller.",
                                     settings.CTRL).parse_args(argv)

    from twisted.internet import reactor

    from usher.config import load_config
    from usher.controller.service import make_service
    try:
        config = load_config(settings.CTRL, extra_files=options.config,
                             isolated=options.isolated)
        root, _controller = make_service(config, reactor)
        ctrl = config["ctrl"]
        daemon.start_logging(ctrl["log_file"], ctrl["log_level"])
    except ConfigError as e:
        print(f"usherctrl: configuration error: {e}", file=sys.stderr)
        return 2
    return daemon.run(reactor, root, name="usherctrl", pid_file=ctrl["pid_file"],
                      on_running=daemon.settle_heap)


if __name__ == "__main__":
    sys.exit(main())

"""usherctrl: the Usher controller."""

import sys


def build(options, config, reactor):
    from usher import daemon
    from usher.controller.service import make_service

    root, _controller = make_service(config, reactor)
    return daemon.Daemon(root, "usherctrl", on_ready=daemon.settle_heap)


def main(argv=None):
    from usher import daemon, settings
    return daemon.main(argv, prog="usherctrl", description="The Usher controller.",
                       component=settings.CTRL, build=build)


if __name__ == "__main__":
    sys.exit(main())

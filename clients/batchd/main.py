"""usherbatchd the daemon: one root MultiService (the thread pool, the link
to the controller, the scheduler) from a loaded configuration, and ``main``
(``usher.daemon.main``)."""

import sys

from twisted.application import service
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from usher.daemon import ThreadPoolService

from .hooks import HookRunner
from .link import ControllerLink
from .scheduler import Scheduler
from .settings import BATCHD, BatchSettings
from .spool import Spool

log = Logger()


class _SchedulerAfterLogin(service.Service):
    """Starts the scheduler once its state is read and the link logged in."""

    def __init__(self, scheduler, link):
        self.scheduler = scheduler
        self.link = link
        self._started = None

    def startService(self):
        super().startService()
        from twisted.internet import defer
        self._started = defer.Deferred.fromCoroutine(self._start())
        self._started.addErrback(lambda f: log.failure("usherbatchd cannot start", f))

    async def _start(self):
        await self.scheduler.load()
        await self.link.when_ready()
        if self.running:
            self.scheduler.startService()

    def stopService(self):
        super().stopService()
        if self.scheduler.running:
            return self.scheduler.stopService()
        return None


def make_service(config, reactor, *, link=None, hooks_runner=None):
    """-> (root MultiService, Scheduler) for a loaded batchd configuration."""
    settings = config if isinstance(config, BatchSettings) else BatchSettings.from_config(config)
    root = service.MultiService()
    pool = ThreadPool(minthreads=1, maxthreads=4, name="usherbatchd")
    # The threads for files and hook commands (never the reactor's).
    ThreadPoolService(pool).setServiceParent(root)
    link = link or ControllerLink(settings, reactor)
    link.setServiceParent(root)
    hooks = hooks_runner or HookRunner(reactor, pool, settings.hook_timeout)
    scheduler = Scheduler(settings, link, Spool(settings.queue_dir, settings.state_dir), hooks,
                          reactor, pool=pool)
    _SchedulerAfterLogin(scheduler, link).setServiceParent(root)
    return root, scheduler


def build(options, config, reactor):
    from usher import daemon

    root, scheduler = make_service(config, reactor)
    settings = scheduler.settings

    def ready():
        return scheduler_ready(scheduler)

    def up():
        log.info("usherbatchd running: queue {queue}, controller {host}:{port}",
                 queue=settings.queue_dir, host=settings.controller_host,
                 port=settings.controller_port)
    return daemon.Daemon(root, "usherbatchd", ready=ready, on_ready=up)


def scheduler_ready(scheduler):
    """Up once logged in (a controller that is away is retried, logged)."""
    return scheduler.link.when_ready()


def main(argv=None):
    from usher import daemon
    return daemon.main(argv, prog="usherbatchd",
                       description="usherbatchd: Usher's batch policy daemon (RRC-KI): runs "
                                   "queued jobs in guaranteed VMs packed onto few hosts.",
                       component=BATCHD, build=build)


if __name__ == "__main__":
    sys.exit(main())

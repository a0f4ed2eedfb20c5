"""A blocking wrapper around the client library, for scripts.

    from usher.client.blocking import BlockingClient
    with BlockingClient("ctrl", 7390, ca_file=..., username="alice", password=...) as usher:
        usher.start(cluster="web", count=3)
        for vm in usher.list():
            print(vm["name"], vm["state"])

``host`` may list several controllers (high availability), as for
UsherClient: ``BlockingClient("ctl1, ctl2:7390", 7390, ...)`` logs in to
the active one and follows it.

The Twisted reactor runs in a background thread (started on first use, if
no reactor is running yet); each call waits for its result and raises the
same UsherError subclasses as the asynchronous API. Change callbacks run in
the reactor thread.
"""

import threading

from twisted.internet import threads

from usher.client import UsherClient
from usher.states import OPERATIONS

_reactor_thread = None
_reactor_lock = threading.Lock()


def _ensure_reactor(reactor):
    global _reactor_thread
    with _reactor_lock:
        if reactor.running or (_reactor_thread is not None and _reactor_thread.is_alive()):
            return
        _reactor_thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False},
            name="usher-reactor", daemon=True)
        _reactor_thread.start()


class BlockingClient:
    def __init__(self, host, port, *, reactor=None, **kwargs):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        _ensure_reactor(reactor)
        self._client = threads.blockingCallFromThread(
            reactor, lambda: UsherClient(reactor, host, port, **kwargs))

    def _call(self, method, *args, **kwargs):
        return threads.blockingCallFromThread(
            self._reactor, lambda: getattr(self._client, method)(*args, **kwargs))

    @property
    def vms(self):
        return threads.blockingCallFromThread(self._reactor, lambda: dict(self._client.vms))

    def connect(self):
        return self._call("connect")

    def close(self):
        return self._call("disconnect")

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def on_change(self, callback):
        return self._call("on_change", callback)

    def list(self, selection=None, status=False, remote=False):
        return self._call("list", selection, status, remote)

    def list_lnm(self, patterns=(), status=False):
        return self._call("list_lnm", patterns, status)

    def start(self, names=(), cluster=None, count=None, lnms=(), args=None):
        return self._call("start", names, cluster, count, lnms, args)

    def op_on(self, operation, selection, args=None):
        return self._call("op_on", operation, selection, args)

    def migrate(self, selection, lnms=(), args=None):
        return self._call("migrate", selection, lnms, args)

    def query(self, name, /, **args):
        return self._call("query", name, **args)

    def plugins(self):
        return self._call("plugins")

    def register_plugin(self, name, event, config_file=None, order=None):
        return self._call("register_plugin", name, event, config_file, order)

    def unregister_plugin(self, name, event=None):
        return self._call("unregister_plugin", name, event)


def _operation(operation):
    def method(self, selection, args=None):
        return self.op_on(operation, selection, args)
    method.__name__ = operation
    return method


for _op in OPERATIONS:
    setattr(BlockingClient, _op, _operation(_op))
del _op

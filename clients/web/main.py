"""usherweb the daemon: its services (the sessions and the HTTPS listener)
from a loaded configuration, and ``main`` (``usher.daemon.main``)."""

import os
import sys

from twisted.application import internet, service
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.logger import Logger

from usher import pki
from usher.controllers import check_gateway_tls
from usher.clients.web.api import Api
from usher.clients.web.openapi import document
from usher.clients.web.resource import make_site
from usher.clients.web.sessions import WebSessions
from usher.clients.web.settings import WebSettings
from usher.errors import ConfigError

log = Logger()


def check_transport(settings):
    """HTTPS unless the site says otherwise: the browser sends passwords and
    session cookies."""
    cert, key = settings.ssl_cert_file, settings.ssl_key_file
    if (cert is None) != (key is None):
        raise ConfigError("[web] ssl_cert_file and ssl_key_file: set both (HTTPS) or "
                          "neither (plain HTTP, which needs allow_plain_http = true)")
    if cert is None and not settings.allow_plain_http:
        raise ConfigError("[web] ssl_cert_file and ssl_key_file are not set: usherweb serves "
                          "HTTPS only (make a certificate with `usher cert issue`), unless "
                          "allow_plain_http = true (then passwords and session cookies "
                          "cross the network in clear text)")
    if settings.static_dir is not None and not os.path.isdir(settings.static_dir):
        raise ConfigError(f"[web] static_dir: {settings.static_dir} is not a directory")
    if not os.path.isdir(settings.static_root):
        log.warn("usherweb: no browser interface at {path}; serving the API only",
                 path=settings.static_root)


def server_endpoint(reactor, settings, port=None):
    port = settings.port if port is None else port
    if settings.ssl_cert_file is None:
        return TCP4ServerEndpoint(reactor, port, interface=settings.interface)
    return SSL4ServerEndpoint(reactor, port,
                              pki.server_tls_options(settings.ssl_cert_file,
                                                     settings.ssl_key_file),
                              interface=settings.interface)


def client_factory(settings, reactor):
    """-> factory(user, password, source) of UsherClients for the sessions."""
    from usher.client import UsherClient

    def make(user, password, source):
        s = settings
        return UsherClient(reactor, s.controller_host, s.controller_port,
                           ca_file=s.ssl_ca_file, tls_name=s.controller_tls_name,
                           cert_file=s.gateway_cert_file, key_file=s.gateway_key_file,
                           username=user, password=password, timeout=s.call_timeout,
                           source=source)
    return make


class _SessionsService(service.Service):
    def __init__(self, sessions):
        self.sessions = sessions

    def stopService(self):
        super().stopService()
        return self.sessions.stop()


def build_api(settings, reactor, *, clock=None, make_client=None):
    """-> Api (sessions on ``clock``, clients from ``make_client``)."""
    clock = reactor if clock is None else clock
    sessions = WebSessions(settings, clock, make_client or client_factory(settings, reactor))
    return Api(sessions, settings, clock, document())


def make_service(config, reactor):
    """-> (root MultiService, Api) for a loaded web configuration."""
    settings = config if isinstance(config, WebSettings) else WebSettings.from_config(config)
    check_transport(settings)
    # A bad CA file, or a gateway certificate without role gateway, is refused
    # now rather than at the first login.
    # (Every controller listed, high availability.)
    check_gateway_tls(settings, "[web] controller_host")
    api = build_api(settings, reactor)
    root = service.MultiService()
    _SessionsService(api.sessions).setServiceParent(root)
    listener = internet.StreamServerEndpointService(server_endpoint(reactor, settings),
                                                    make_site(api, settings))
    listener._raiseSynchronously = True
    listener.setServiceParent(root)
    return root, api


def url_of(settings):
    scheme = "https" if settings.https else "http"
    return f"{scheme}://{settings.interface}:{settings.port}/"


def build(options, config, reactor):
    from usher import daemon

    root, api = make_service(config, reactor)

    def serving():
        log.info("usherweb serving on {url}", url=url_of(api.settings))
    return daemon.Daemon(root, "usherweb", on_ready=serving)


def main(argv=None):
    from usher import daemon, settings
    return daemon.main(argv, prog="usherweb",
                       description="usherweb: Usher's web interface and REST API.",
                       component=settings.WEB, build=build)


if __name__ == "__main__":
    sys.exit(main())

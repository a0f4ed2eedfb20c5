"""plusher the daemon: its services (the gateway and the HTTP(S) listener)
from a loaded configuration, and ``main`` (``usher.daemon.main``)."""

import ipaddress
import sys

from twisted.application import internet, service
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.logger import Logger

from usher import pki
from usher.controllers import check_gateway_tls
from usher.clients.plusher.gateway import Gateway
from usher.clients.plusher.resource import make_site
from usher.clients.plusher.settings import PlusherSettings
from usher.errors import ConfigError

log = Logger()


def check_transport(settings):
    """Plain HTTP carries users' passwords in clear text: only on a loopback
    interface, unless the site says otherwise (allow_plain_http)."""
    if settings.ssl_cert_file is not None or settings.allow_plain_http:
        return
    try:
        loopback = ipaddress.ip_address(settings.interface).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"[plusher] interface {settings.interface} is not a loopback "
                          "address: serve HTTPS there (ssl_cert_file, ssl_key_file), or set "
                          "allow_plain_http = true (passwords then cross the network in "
                          "clear text)")


def server_endpoint(reactor, settings, port=None):
    """HTTPS when plusher has a certificate and key, else HTTP."""
    port = settings.port if port is None else port
    cert, key = settings.ssl_cert_file, settings.ssl_key_file
    if (cert is None) != (key is None):
        raise ConfigError("[plusher] ssl_cert_file and ssl_key_file: set both (HTTPS) or "
                          "neither (HTTP)")
    if cert is None:
        return TCP4ServerEndpoint(reactor, port, interface=settings.interface)
    return SSL4ServerEndpoint(reactor, port, pki.server_tls_options(cert, key),
                              interface=settings.interface)


class _GatewayService(service.Service):
    def __init__(self, gateway):
        self.gateway = gateway

    def stopService(self):
        super().stopService()
        return self.gateway.stop()


def make_service(config, reactor):
    """-> (root MultiService, Gateway) for a loaded plusher configuration."""
    settings = PlusherSettings.from_config(config)
    # Refuse a bad CA file, or a gateway certificate without role gateway, at
    # start (the controller accepts only a controller certificate, and a
    # client certificate only of role gateway).
    # (Every controller listed, high availability.)
    check_gateway_tls(settings, "[plusher] controller_host")
    check_transport(settings)
    root = service.MultiService()
    gateway = Gateway(settings, reactor)
    _GatewayService(gateway).setServiceParent(root)
    listener = internet.StreamServerEndpointService(server_endpoint(reactor, settings),
                                                    make_site(gateway))
    listener._raiseSynchronously = True
    listener.setServiceParent(root)
    return root, gateway


def build(options, config, reactor):
    from usher import daemon

    root, _gateway = make_service(config, reactor)
    section = config["plusher"]
    scheme = "https" if section["ssl_cert_file"] else "http"

    def serving():
        log.info("plusher serving XML-RPC on {url}",
                 url=f"{scheme}://{section['interface']}:{section['port']}/")
    return daemon.Daemon(root, "plusher", on_ready=serving)


def main(argv=None):
    from usher import daemon, settings
    return daemon.main(argv, prog="plusher",
                       description="plusher: the XML-RPC gateway between Plush and Usher.",
                       component=settings.PLUSHER, build=build)


if __name__ == "__main__":
    sys.exit(main())

"""The controllers an LNM or a client is configured with, and dialing them
in turn (high availability, usher.protocol).

``controller_host`` is a comma-separated list of ``host[:port]`` entries
(one string in the configuration, split here; a list is taken too)
(``[v6 address]:port`` for an IPv6 address with a port); an entry without a
port takes ``controller_port``. ``controller_tls_name`` is the name every
controller's certificate must carry (one name for all), or a list with one
name per entry; by default each entry's host. One entry is today's single
controller and behaves exactly as before.

``Rotation`` dials the entries in turn: a failed connection, or a refusal
after it (a standby controller's ``Standby``, a stale term), moves to the
next entry at once; only after a full round with no success does the
retry policy's backoff apply (``Rotation.policy``, given to ClientService).
"""

from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress as isIPv4Address
from twisted.internet.abstract import isIPv6Address
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from usher.errors import ConfigError

log = Logger()

# Entries in one controller_host list (a site has two or three).
MAX_CONTROLLERS = 16


@dataclass(frozen=True)
class Controller:
    host: str
    port: int
    tls_name: str

    @property
    def label(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _split_entry(entry, default_port, where):
    text = str(entry).strip()
    if not text:
        raise ConfigError(f"{where}: an empty controller_host entry")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not isIPv6Address(host):
            raise ConfigError(f"{where}: controller_host entry {text[:80]!r}: write an IPv6 "
                              "address as [address] or [address]:port")
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise ConfigError(f"{where}: controller_host entry {text[:80]!r}: expected "
                              "[address]:port")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        # A bare IPv6 address (several colons) or a name without a port.
        host, port = text, None
    if not host or any(c.isspace() for c in host) or len(host) > 253:
        raise ConfigError(f"{where}: controller_host entry {text[:80]!r} is not a host name "
                          "or address")
    if port is None or port == "":
        if port == "":
            raise ConfigError(f"{where}: controller_host entry {text[:80]!r}: empty port")
        return host, default_port
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: controller_host entry {text[:80]!r}: the port must be "
                          "a number from 1 to 65535")
    return host, int(port)


def parse_controllers(hosts, default_port, tls_names=None, *, where="controller_host"):
    """``controller_host`` (a string or a list of entries), ``controller_port``
    and ``controller_tls_name`` (None, a name, or a list of one per entry)
    -> [Controller]. Raises ConfigError naming ``where``."""
    if isinstance(hosts, str):
        hosts = [part for part in hosts.split(",") if part.strip()] or [hosts]
    hosts = list(hosts)
    if not hosts:
        raise ConfigError(f"{where}: controller_host names no controller")
    if len(hosts) > MAX_CONTROLLERS:
        raise ConfigError(f"{where}: controller_host lists {len(hosts)} controllers "
                          f"(at most {MAX_CONTROLLERS})")
    if tls_names is None or tls_names == [] or tls_names == "":
        names = [None] * len(hosts)
    else:
        if isinstance(tls_names, str):
            tls_names = [part for part in tls_names.split(",") if part.strip()] or [tls_names]
        names = list(tls_names)
        if len(names) == 1:
            names = names * len(hosts)
        elif len(names) != len(hosts):
            raise ConfigError(f"{where}: controller_tls_name lists {len(names)} names for "
                              f"{len(hosts)} controllers: give one name for all, or one "
                              "per controller_host entry")
    controllers = []
    for entry, name in zip(hosts, names):
        host, port = _split_entry(entry, default_port, where)
        controllers.append(Controller(host, port, str(name).strip() if name else host))
    seen = set()
    for controller in controllers:
        if (controller.host, controller.port) in seen:
            raise ConfigError(f"{where}: controller {controller.label} is listed twice")
        seen.add((controller.host, controller.port))
    return controllers


def controllers_of(section, where):
    """The controllers a configuration section (``[lnm]``, ``[ush]`` ...)
    names: its controller_host, controller_port and controller_tls_name."""
    return parse_controllers(section["controller_host"], section["controller_port"],
                             section.get("controller_tls_name"), where=where)


def check_gateway_tls(settings, where):
    """At a gateway's start (plusher, usherweb): refuse a bad CA file, or a
    gateway certificate without role gateway, for every controller listed
    (``settings``: controller_host, controller_port, controller_tls_name,
    ssl_ca_file, gateway_cert_file, gateway_key_file)."""
    from usher import pki
    for controller in parse_controllers(settings.controller_host, settings.controller_port,
                                        settings.controller_tls_name, where=where):
        pki.client_tls_options(controller.tls_name, settings.ssl_ca_file,
                               settings.gateway_cert_file, settings.gateway_key_file,
                               role=pki.ROLE_GATEWAY)


def tcp_endpoint(reactor, host, port, **kwargs):
    """A TCP client endpoint to ``host``: no name resolution for an address
    (a thread job per connection otherwise)."""
    from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint,
                                            TCP6ClientEndpoint)
    if isIPv4Address(host):
        return TCP4ClientEndpoint(reactor, host, port, **kwargs)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, **kwargs)
    return HostnameEndpoint(reactor, host, port, **kwargs)


class Rotation:
    """Dials ``controllers`` (a list of objects, each with ``label``) in
    turn through ``make_endpoint(controller)``.

    ``endpoint`` connects to the current entry; the owner reports what
    became of it: ``failed(reason)`` (a refusal after connecting, e.g.
    Standby: next entry), ``succeeded()`` (attached or logged in: the round
    starts again from here), ``lost()`` (a working connection dropped: the
    next entry at once). ``policy`` is the ClientService retry policy: no
    delay while a round is under way, ``base_policy(rounds)`` after
    ``rounds`` full rounds without success."""

    def __init__(self, controllers, make_endpoint, *, base_policy, on_round_failed=None):
        if not controllers:
            raise ValueError("no controllers")
        self.controllers = list(controllers)
        self._make_endpoint = make_endpoint
        self._endpoints = {}
        self.base_policy = base_policy
        self.on_round_failed = on_round_failed
        self.index = 0
        self.tried = 0            # entries tried in the current round
        self.failed_rounds = 0    # full rounds without success, in a row
        self.dialed = None        # the entry of the last connection attempt
        self.errors = {}          # label -> the last error of this round
        self.endpoint = _RotatingEndpoint(self)

    @property
    def current(self):
        return self.controllers[self.index]

    def endpoint_of(self, controller):
        endpoint = self._endpoints.get(controller)
        if endpoint is None:
            endpoint = self._endpoints[controller] = self._make_endpoint(controller)
        return endpoint

    def _advance(self, error=None):
        if error is not None:
            self.errors[self.current.label] = error
        self.index = (self.index + 1) % len(self.controllers)
        self.tried += 1
        if self.tried >= len(self.controllers):
            self.tried = 0
            self.failed_rounds += 1
            errors, self.errors = self.errors, {}
            if self.on_round_failed is not None:
                self.on_round_failed(errors)
            return True
        return False

    def failed(self, error=None):
        """The entry dialed last refused us or could not be reached: the
        next one. -> True when that ended a round."""
        if self.dialed is not None and self.dialed is not self.current:
            # Already moved on (e.g. lost() then failed() for one connection).
            return False
        return self._advance(error)

    def succeeded(self):
        self.tried = 0
        self.failed_rounds = 0
        self.errors = {}

    def lost(self):
        """A connection that worked dropped: try the next entry at once
        (the active controller may have died; a standby takes over)."""
        self.tried = 0
        self.failed_rounds = 0
        if len(self.controllers) > 1:
            self.index = (self.index + 1) % len(self.controllers)
            self.tried = 1

    def new_round(self):
        """Dial around the list from the next entry, at once."""
        self.tried = 0
        self.failed_rounds = 0
        self.errors = {}
        if len(self.controllers) > 1:
            self.index = (self.index + 1) % len(self.controllers)

    def policy(self, attempt):
        if self.tried:
            return 0
        return self.base_policy(max(1, self.failed_rounds))


@implementer(IStreamClientEndpoint)
class _RotatingEndpoint:
    """Dials the rotation's current entry."""

    def __init__(self, rotation):
        self.rotation = rotation

    def connect(self, factory):
        rotation = self.rotation
        controller = rotation.dialed = rotation.current
        d = defer.maybeDeferred(rotation.endpoint_of(controller).connect, factory)

        def failed(failure):
            if rotation.dialed is controller and rotation.current is controller:
                rotation._advance(failure.getErrorMessage())
            log.debug("cannot reach the controller at {controller}: {error}",
                      controller=controller.label, error=failure.getErrorMessage())
            return failure
        return d.addErrback(failed)


__all__ = ["Controller", "MAX_CONTROLLERS", "Rotation", "check_gateway_tls", "controllers_of",
           "parse_controllers", "tcp_endpoint"]

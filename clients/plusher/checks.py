"""plusher's checks of what Plush sends: request options, VM names, and
up-call URLs against the hosts the site allows (``callback_hosts``)."""

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from usher.errors import ConfigError, InvalidRequest
from usher.protocol import MAX_FIELD, MAX_REQUEST_NAMES

MAX_OPTION_NAME = 64


def check_string(value, what):
    """``value``, a non-empty string of at most MAX_FIELD characters."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{what} must be a non-empty string")
    if len(value) > MAX_FIELD:
        raise InvalidRequest(f"{what} is too long (at most {MAX_FIELD} characters)")
    return value


def check_options(options):
    """request_vms' options struct -> (start arguments, suggested LNMs)."""
    if not isinstance(options, Mapping):
        raise InvalidRequest("options must be a struct (give an empty struct for none)")
    args, lnms = {}, []
    for key, value in options.items():
        if key == "lnms":
            if not isinstance(value, list) or not all(isinstance(n, str) and n
                                                      for n in value):
                raise InvalidRequest("option 'lnms' must be an array of LNM names")
            lnms = list(value)
            continue
        if key in ("cluster", "count"):
            raise InvalidRequest(f"{key!r} is an argument of request_vms, not an option")
        if not isinstance(key, str) or not key.isidentifier() or len(key) > MAX_OPTION_NAME:
            raise InvalidRequest(f"invalid option name {key!r}: use letters, digits and "
                                 f"underscores (at most {MAX_OPTION_NAME})")
        if not (isinstance(value, (bool, int, float))
                or isinstance(value, str) and len(value) <= MAX_FIELD):
            raise InvalidRequest(f"option {key!r} must be a string (at most {MAX_FIELD} "
                                 "characters), a number or a boolean")
        args[key] = value
    for key in ("memory_mib", "vcpus"):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidRequest(f"option {key!r} must be a positive integer")
    return args, lnms


DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = "*"


def _normal_host(host):
    """A host name lowercased, an IP address in its canonical form."""
    host = host.lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_callback_hosts(entries):
    """``callback_hosts`` -> {(host, port)}: ``host`` (the scheme's default
    port only), ``host:port``, or ``host:*`` (any port); a host is a name or
    an IPv4 address (Twisted's XML-RPC client cannot call IPv6 literals).
    Host names are matched exactly, never resolved, never as suffixes."""
    rules = set()
    for entry in entries:
        text = str(entry).strip()
        host, port = text, None
        if text.startswith("[") or text.count(":") > 1:
            raise ConfigError(f"[plusher] callback_hosts: {text!r}: IPv6 addresses are not "
                              "supported (use a host name)")
        if ":" in text:
            host, port = text.split(":")
        if port is not None and port != ANY_PORT:
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ConfigError(f"[plusher] callback_hosts: {text!r}: port must be 1-65535 "
                                  "or *")
            port = int(port)
        if not host or any(c.isspace() or c in "/@?#" for c in host):
            raise ConfigError(f"[plusher] callback_hosts: {text!r} is not host, host:port "
                              "or host:*")
        rules.add((_normal_host(host), port))
    return frozenset(rules)


def safe_url(url):
    """``url`` without its user name and password, for logs and messages."""
    try:
        parts = urlsplit(url)
        if "@" not in parts.netloc:
            return url
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    except ValueError:
        return "(an unparsable URL)"


def check_callback_url(url, allowed_hosts=()):
    """An up-call target: an http(s) URL whose host and port ``allowed_hosts``
    (``callback_hosts``: no up-call to anywhere while it is empty) allow, or
    the empty string for no up-call."""
    if url == "":
        return url
    check_string(url, "callback_url")
    if not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidRequest("callback_url must be an ASCII URL without spaces")
    shown = safe_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise InvalidRequest(f"callback_url must be an http or https URL, not {shown!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise InvalidRequest(f"callback_url {shown!r}: {e}") from None
    if not host:
        raise InvalidRequest(f"callback_url {shown!r} names no host")
    if parts.netloc.count("@") > 1 or ":" in host:
        raise InvalidRequest(f"callback_url {shown!r}: give a host name or IPv4 address, "
                             "and at most one user name and password")
    rules = allowed_hosts if isinstance(allowed_hosts, frozenset) \
        else parse_callback_hosts(allowed_hosts)
    if not rules:
        raise InvalidRequest("this plusher makes no up-calls (the site allows no "
                             "callback_hosts): give an empty callback_url and poll status")
    host = _normal_host(host)
    default = DEFAULT_PORTS[scheme]
    port = default if port is None else port
    if not any(h == host and (p == ANY_PORT or p == port or (p is None and port == default))
               for h, p in rules):
        raise InvalidRequest(f"callback_url {shown!r}: plusher may not call back "
                             f"{host} port {port} (callback_hosts)")
    return url


def check_names(names):
    if not isinstance(names, list) or not names:
        raise InvalidRequest("give a request id or a non-empty array of VM names")
    if len(names) > MAX_REQUEST_NAMES:
        raise InvalidRequest(f"at most {MAX_REQUEST_NAMES} VM names per call")
    for name in names:
        check_string(name, "a VM name")
    return names


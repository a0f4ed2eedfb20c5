"""usherweb's settings: the [web] options as one object."""

import dataclasses
import os
from collections.abc import Mapping

# The browser interface's files, beside this module (the UI's index.html,
# app.js, app.css, and vendor/ filled by ``make setup``).
PACKAGE_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


@dataclasses.dataclass
class WebSettings:
    """The [web] options (see usher.settings.WEB_SPEC and etc/web.config.orig)."""
    interface: str = "127.0.0.1"
    port: int = 7394
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    allow_plain_http: bool = False
    controller_host: str = "localhost"
    controller_port: int = 7390
    controller_tls_name: str | None = None
    ssl_ca_file: str | None = "/etc/usher/ca_cert.pem"
    gateway_cert_file: str | None = None
    gateway_key_file: str | None = None
    call_timeout: float = 60.0
    session_idle_timeout: float = 1800.0
    session_max_age: float = 43200.0
    max_sessions: int = 1000
    max_streams_per_session: int = 8
    max_request_bytes: int = 64 * 1024
    stream_keepalive: float = 15.0
    stream_coalesce: float = 0.1
    stream_buffer_bytes: int = 8 * 1024 * 1024
    static_dir: str | None = None
    log_file: str | None = None
    log_level: str = "info"
    pid_file: str | None = None

    @property
    def https(self):
        return self.ssl_cert_file is not None

    @property
    def static_root(self):
        return self.static_dir or PACKAGE_STATIC

    @classmethod
    def from_config(cls, config):
        """From the dict load_config returns (or its "web" section)."""
        if isinstance(config, Mapping) and isinstance(config.get("web"), Mapping):
            config = config["web"]
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

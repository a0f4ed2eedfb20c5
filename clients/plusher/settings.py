"""plusher's settings: the [plusher] options as one object."""

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass
class PlusherSettings:
    """The [plusher] options (see usher.settings.PLUSHER_SPEC)."""
    interface: str = "127.0.0.1"
    port: int = 7393
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    controller_host: str = "localhost"
    controller_port: int = 7390
    controller_tls_name: str | None = None
    ssl_ca_file: str | None = "/etc/usher/ca_cert.pem"
    gateway_cert_file: str | None = None
    gateway_key_file: str | None = None
    call_timeout: float = 60.0
    session_idle_timeout: float = 600.0
    max_sessions: int = 1000
    ready_timeout: float = 600.0
    request_retention: float = 3600.0
    callback_hosts: list = dataclasses.field(default_factory=list)
    max_request_bytes: int = 1024 * 1024
    allow_plain_http: bool = False
    upcall_attempts: int = 5
    upcall_initial_delay: float = 1.0
    upcall_max_delay: float = 60.0
    upcall_timeout: float = 30.0
    address_args: list = dataclasses.field(
        default_factory=lambda: ["ip", "ip_address", "address"])
    log_file: str | None = None
    log_level: str = "info"
    pid_file: str | None = None

    @classmethod
    def from_config(cls, config):
        """From the dict load_config returns (or its "plusher" section)."""
        if isinstance(config, Mapping) and isinstance(config.get("plusher"), Mapping):
            config = config["plusher"]
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})


"""usherbatchd's settings: the [batchd] options (``BATCHD_SPEC``, read like
every Usher daemon's by ``usher.config``) as one checked object."""

import dataclasses
import shlex
import string
from collections.abc import Mapping

from usher.config import ComponentSpec
from usher.errors import ConfigError

_PORT = "integer(min=1, max=65535, default={})"

BATCHD_SPEC = f"""
[batchd]
controller_host = string(default='localhost')
controller_port = {_PORT.format(7390)}
controller_tls_name = string(default=None)
ssl_ca_file = path(default='/etc/usher/ca_cert.pem')
username = string(default='usherbatchd')
password_file = path(default='/etc/usher/batchd.password')
call_timeout = float(gt=0, default=60)
queue_dir = path(default='/var/spool/usher/batch')
state_dir = path(default='/var/lib/usher/batchd')
poll_interval = float(gt=0, default=5)
cluster = string(default='batch')
max_walltime = float(gt=0, default=604800)
max_vcpus = integer(min=1, default=64)
max_memory_mib = integer(min=64, default=262144)
max_queued = integer(min=1, default=10000)
max_start_attempts = integer(min=1, default=5)
stop_grace = float(min=0, default=60)
reserved_cpus = integer(min=0, default=0)
reserved_memory_mib = integer(min=0, default=0)
max_migrations = integer(min=0, default=2)
consolidate_min_remaining = float(min=0, default=300)
power_off_command = string(default=None)
power_on_command = string(default=None)
hook_timeout = float(gt=0, default=120)
idle_before_power_off = float(min=0, default=600)
min_powered_on = integer(min=0, default=1)
power_on_after = float(min=0, default=0)
power_on_timeout = float(gt=0, default=900)
log_file = path(default=None)
log_level = option('debug', 'info', 'warn', 'error', 'critical', default='info')
pid_file = path(default=None)
[[hosts]]
[[[__many__]]]
hostname = string(default=None)
power_off_command = string(default=None)
power_on_command = string(default=None)
"""

BATCHD = ComponentSpec(
    name="batchd",
    spec=BATCHD_SPEC,
    host_file="/etc/usher/batchd.config",
    home_file=".usher/batchd.config",
    env_var="USHER_BATCHD_CONFIG",
)

# The placeholders a hook command may use.
HOOK_FIELDS = frozenset({"lnm", "hostname"})


def parse_hook(text, key):
    """A hook command line -> argv (a list of words, no shell), its
    placeholders checked; None stays None."""
    if text is None:
        return None
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"[batchd] {key}: {e}") from None
    if not argv:
        raise ConfigError(f"[batchd] {key}: an empty command")
    for word in argv:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(word) if name is not None}
        except ValueError as e:
            raise ConfigError(f"[batchd] {key}: {word!r}: {e}") from None
        unknown = fields - HOOK_FIELDS
        if unknown:
            raise ConfigError(f"[batchd] {key}: unknown placeholder {{{sorted(unknown)[0]}}} "
                              f"(use {{lnm}} or {{hostname}})")
    return argv


@dataclasses.dataclass
class HostSettings:
    hostname: str | None = None
    power_off_command: list | None = None
    power_on_command: list | None = None


@dataclasses.dataclass
class BatchSettings:
    """The [batchd] options (see BATCHD_SPEC and etc/batchd.config.orig)."""
    controller_host: str = "localhost"
    controller_port: int = 7390
    controller_tls_name: str | None = None
    ssl_ca_file: str | None = "/etc/usher/ca_cert.pem"
    username: str = "usherbatchd"
    password_file: str | None = "/etc/usher/batchd.password"
    call_timeout: float = 60.0
    queue_dir: str = "/var/spool/usher/batch"
    state_dir: str = "/var/lib/usher/batchd"
    poll_interval: float = 5.0
    cluster: str = "batch"
    max_walltime: float = 604800.0
    max_vcpus: int = 64
    max_memory_mib: int = 262144
    max_queued: int = 10000
    max_start_attempts: int = 5
    stop_grace: float = 60.0
    reserved_cpus: int = 0
    reserved_memory_mib: int = 0
    max_migrations: int = 2
    consolidate_min_remaining: float = 300.0
    power_off_command: list | None = None
    power_on_command: list | None = None
    hook_timeout: float = 120.0
    idle_before_power_off: float = 600.0
    min_powered_on: int = 1
    power_on_after: float = 0.0
    power_on_timeout: float = 900.0
    hosts: dict = dataclasses.field(default_factory=dict)
    log_file: str | None = None
    log_level: str = "info"
    pid_file: str | None = None

    @classmethod
    def from_config(cls, config):
        """From the dict load_config returns (or its "batchd" section)."""
        if isinstance(config, Mapping) and isinstance(config.get("batchd"), Mapping):
            config = config["batchd"]
        names = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in config.items() if key in names}
        for key in ("power_off_command", "power_on_command"):
            values[key] = parse_hook(values.get(key), key)
        hosts = {}
        for name, options in (values.get("hosts") or {}).items():
            hosts[name] = HostSettings(
                hostname=options.get("hostname"),
                power_off_command=parse_hook(options.get("power_off_command"),
                                             f"hosts {name} power_off_command"),
                power_on_command=parse_hook(options.get("power_on_command"),
                                            f"hosts {name} power_on_command"))
        values["hosts"] = hosts
        from usher.naming import check_label
        from usher.errors import InvalidRequest
        try:
            check_label(values.get("cluster", cls.cluster), "cluster")
        except InvalidRequest as e:
            raise ConfigError(f"[batchd] cluster: {e}") from None
        return cls(**values)

    def read_password(self):
        """The daemon's password: the first line of ``password_file`` (kept
        apart so that batchd.config may be readable by the users who submit)."""
        if not self.password_file:
            raise ConfigError("[batchd] password_file: not set (a file holding the password of "
                              f"the administrator account {self.username!r})")
        try:
            with open(self.password_file, encoding="utf-8") as f:
                password = f.readline().strip()
        except OSError as e:
            raise ConfigError(f"[batchd] password_file: cannot read {self.password_file}: "
                              f"{e.strerror or e}") from None
        if not password:
            raise ConfigError(f"[batchd] password_file: {self.password_file} is empty")
        return password

    def hook(self, kind, lnm):
        """The argv of hook ``kind`` ("power_off"/"power_on") for ``lnm``,
        None when the site configured none."""
        host = self.hosts.get(lnm)
        argv = getattr(host, f"{kind}_command", None) if host else None
        return argv or getattr(self, f"{kind}_command")

    def hostname(self, lnm, reported=None):
        host = self.hosts.get(lnm)
        return (host.hostname if host and host.hostname else None) or reported or lnm

"""ush's settings: the [ush] options it uses, read from its configuration
files (the rules are in ``usher.settings.USH_SPEC``)."""

import dataclasses
import getpass
import os
import stat
from collections.abc import Mapping

from usher.errors import ConfigError


@dataclasses.dataclass
class UshSettings:
    """The [ush] options ush uses (see usher.settings.USH_SPEC)."""
    controller_host: str | None = "localhost"
    controller_port: int | None = 7390
    controller_tls_name: str | None = None
    ssl_ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    history_file: str | None = None
    clusters: list = dataclasses.field(default_factory=list)
    call_timeout: float = 60.0
    notices: bool = True

    @classmethod
    def from_config(cls, config):
        """From the dict load_config returns (its "ush" section, or the
        section itself)."""
        if isinstance(config, Mapping) and isinstance(config.get("ush"), Mapping):
            config = config["ush"]
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    @property
    def login_name(self):
        return self.username or getpass.getuser()

    def load_files(self):
        """Before any password is asked: check that the CA file is readable
        and read password_file (only the user's; its first line is the
        password) into ``password``. Raises ConfigError naming the option."""
        if not self.ssl_ca_file:
            raise ConfigError("ssl_ca_file is not set in the [ush] section (the CA "
                              "certificate that signed the controller's)")
        try:
            with open(self.ssl_ca_file, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"[ush] ssl_ca_file {self.ssl_ca_file}: {exc.strerror} (the "
                              "site CA certificate, which signed the controller's)") from None
        if self.password is None and self.password_file:
            self.password = read_password_file(self.password_file)


def read_password_file(path):
    """The first line of ``path``, a regular file no one else may read."""
    try:
        # Non-blocking: a FIFO named by mistake must not hang ush.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"[ush] password_file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"[ush] password_file {path}: not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(f"[ush] password_file {path}: others may read it (mode "
                              f"{stat.S_IMODE(info.st_mode):o}); chmod 600 it")
        data = f.read(4097)
    if len(data) > 4096:
        raise ConfigError(f"[ush] password_file {path}: longer than 4096 bytes")
    try:
        line = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"[ush] password_file {path}: not UTF-8 text") from None
    if not line or not line[0]:
        raise ConfigError(f"[ush] password_file {path}: empty first line")
    return line[0]


def load_settings(config_files=(), isolated=False):
    """Read ush's configuration files (raises usher.errors.ConfigError):
    the usual ones then ``config_files`` (a path or a list), or only those
    with ``isolated``."""
    from usher import config, settings
    if isinstance(config_files, (str, os.PathLike)):
        config_files = [config_files]
    extra = [path for path in config_files or () if path]
    return UshSettings.from_config(config.load_config(settings.USH, extra_files=extra,
                                                      isolated=isolated))

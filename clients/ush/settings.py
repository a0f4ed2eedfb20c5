"""ush's settings: the [ush] options it uses, read from its configuration
files (the rules are in ``usher.settings.USH_SPEC``)."""

import dataclasses
import getpass
from collections.abc import Mapping


@dataclasses.dataclass
class UshSettings:
    """The [ush] options ush uses (see usher.settings.USH_SPEC)."""
    controller_host: str | None = "localhost"
    controller_port: int | None = 7390
    controller_tls_name: str | None = None
    ssl_ca_file: str | None = None
    username: str | None = None
    password: str | None = None
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


def load_settings(config_file=None):
    """Read ush's configuration files (raises usher.errors.ConfigError)."""
    from usher import config, settings
    extra = [config_file] if config_file else []
    return UshSettings.from_config(config.load_config(settings.USH, extra_files=extra))

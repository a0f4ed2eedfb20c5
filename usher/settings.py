"""Every configuration option of the controller, the LNM and ush: types and
defaults (the sample files in ``etc/*.config.orig`` document each one).

Specs use the configspec format of ``usher.config``. A value of ``None`` in
a default means "no value"; the option then also accepts a bare ``None``.
"""

from usher.config import ComponentSpec
from usher.states import OPERATIONS

# Twisted's log level names (twisted.logger.LogLevel.levelWithName).
_LOG_LEVEL = "option('debug', 'info', 'warn', 'error', 'critical', default='info')"
_PORT = "integer(min=1, max=65535, default={})"

# Every request event (as usher.controller.events names them: one per request
# kind, one per Table 3 operation); open authorization approves them all.
REQUEST_EVENTS = ("start_request", "migrate_request", "list_request") + tuple(
    f"{operation}_request" for operation in OPERATIONS)

CTRL_SPEC = f"""
[ctrl]
domain = string(default='usher.local')
client_interface = string(default='127.0.0.1')
client_port = {_PORT.format(7390)}
lnm_interface = string(default='127.0.0.1')
lnm_port = {_PORT.format(7391)}
lnm_names = list(default=list())
ssl_key_file = path(default='/etc/usher/usherctrl_key.pem')
ssl_cert_file = path(default='/etc/usher/usherctrl_cert.pem')
ssl_ca_file = path(default='/etc/usher/ca_cert.pem')
state_dir = path(default='/var/lib/usher/ctrl')
passwd_file = path(default='/etc/usher/passwd')
auth_modules = list(min=1, default=list('local'))
pam_service = string(default='usher')
pam_admin_group = string(default=None)
pam_min_uid = integer(min=0, default=1000)
ldap_config = path(default='/etc/usher/plugins/ldap.config')
login_timeout = float(gt=0, default=30)
max_prelogin_bytes = integer(min=1024, default=65536)
max_concurrent_logins = integer(min=1, default=16)
login_source_failures = integer(min=1, default=10)
login_source_lockout = float(gt=0, default=60)
login_source_lockout_max = float(gt=0, default=3600)
login_user_failures = integer(min=1, default=3)
login_user_delay_max = float(min=1, default=16)
login_failure_memory = float(gt=0, default=3600)
plugin_timeout = float(gt=0, default=10)
plugin_hold_warning = float(gt=0, default=0.1)
admins = list(default=list())
plugin_dir = path(default=None)
call_timeout = float(gt=0, default=30)
start_timeout = float(gt=0, default=120)
default_memory = integer(min=1, default=256)
default_vcpus = integer(min=1, default=1)
max_request_vms = integer(min=1, default=1000)
evacuation_concurrency = integer(min=1, max=64, default=4)
max_selection_names = integer(min=1, default=10000)
max_selection_patterns = integer(min=1, default=32)
user_visibility = option('own', 'all', default='own')
lnm_ping_interval = float(gt=0, default=5)
lnm_ping_timeout = float(gt=0, default=9)
recovery_window = float(gt=0, default=30)
lnm_max_report_changes = integer(min=512, default=1024)
lnm_max_vms = integer(min=1, default=10000)
lnm_max_unmanaged = integer(min=0, default=1000)
status_history = integer(min=0, default=60)
vm_status_history = integer(min=0, default=15)
status_history_interval = float(gt=0, default=60)
metrics_port = integer(min=1, max=65535, default=None)
metrics_interface = string(default='127.0.0.1')
metrics_per_vm = boolean(default=False)
log_file = path(default=None)
log_level = {_LOG_LEVEL}
pid_file = path(default=None)
ha_database = conninfo(default=None)
ha_name = string(default=None)
ha_check_interval = float(gt=0, default=1.0)
ha_lost_after = float(gt=0, default=5.0)
[[plugins]]
[[[__many__]]]
plugin = string(default=None)
events = list(min=1)
config = path(default=None)
order = integer(default=None)
"""

LNM_SPEC = f"""
[lnm]
name = string(default=None)
controller_host = string(default='localhost')
controller_port = {_PORT.format(7391)}
controller_tls_name = string(default=None)
ssl_key_file = path(default='/etc/usher/usherlnm_key.pem')
ssl_cert_file = path(default='/etc/usher/usherlnm_cert.pem')
ssl_ca_file = path(default='/etc/usher/ca_cert.pem')
libvirt_uri = string(default=None)
test_host = boolean(default=False)
host_cpus = integer(min=1, default=8)
host_memory = integer(min=1, default=16384)
host_model = string(default='usher-test-host')
state_dir = path(default='/var/lib/usher/lnm')
domain_template = path(default=None)
request_args = list(default=list())
plugin_args = list(default=list())
image_dirs = list(default=list())
path_args = list(default=list())
bridges = list(default=list())
networks = list(default=list())
vlan_tags = boolean(default=False)
migration_uri = string(default=None)
import_overhead_mib = integer(min=0, max=65536, default=256)
live_migration = boolean(default=True)
shutdown_timeout = float(min=0, max=3600, default=60)
scan_interval = float(gt=0, default=10)
report_interval = float(gt=0, default=0.2)
sample_interval = float(gt=0, default=5)
status_report_interval = float(gt=0, default=15)
simulated_load = option('off', 'idle', 'steady', 'wave', 'bursty', default='off')
threads = integer(min=1, default=4)
recovery_port = {_PORT.format(7392)}
recovery_interface = string(default='127.0.0.1')
ping_interval = float(gt=0, default=5)
ping_timeout = float(gt=0, default=30)
reconnect_initial_delay = float(gt=0, default=1)
reconnect_max_delay = float(gt=0, default=30)
call_timeout = float(gt=0, default=60)
log_file = path(default=None)
log_level = {_LOG_LEVEL}
pid_file = path(default=None)
# Template variables for new VMs (usher.lnm.service.template_defaults). Keep
# it last: options written after it would belong to it.
[[domain]]
__many__ = string()
"""

USH_SPEC = f"""
[ush]
controller_host = string(default='localhost')
controller_port = {_PORT.format(7390)}
controller_tls_name = string(default=None)
ssl_ca_file = path(default='/etc/usher/ca_cert.pem')
username = string(default=None)
password = string(default=None)
password_file = path(default=None)
history_file = path(default='~/.ush_history')
clusters = list(default=list())
call_timeout = float(gt=0, default=60)
notices = boolean(default=True)
"""


def default_plugin_registrations() -> dict:
    """The registrations used when ctrl.config has no [[plugins]] section.

    Shaped like a parsed [[plugins]] section. Open authorization comes first
    so that placement sees only approved requests (plugins without an order
    run in registration order); ``limits`` on starts with its default
    per-user quotas (plugins/limits.py: administrators exempt), so that no
    ordinary user can take every host.
    """
    return {
        "open_authz": {"plugin": "open_authz", "events": list(REQUEST_EVENTS),
                       "config": None, "order": None},
        "limits": {"plugin": "limits", "events": ["start_request"], "config": None,
                   "order": None},
        "roundrobin": {"plugin": "roundrobin", "events": ["start_request", "migrate_request"],
                       "config": None, "order": None},
    }


def _name_plugins_after_registrations(config: dict) -> None:
    for registration_name, registration in config["ctrl"]["plugins"].items():
        if registration["plugin"] is None:
            registration["plugin"] = registration_name


CTRL = ComponentSpec(
    name="ctrl",
    spec=CTRL_SPEC,
    host_file="/etc/usher/ctrl.config",
    home_file=".usher/ctrl.config",
    env_var="USHER_CTRL_CONFIG",
    absent_section_defaults={("ctrl", "plugins"): default_plugin_registrations},
    finalize=_name_plugins_after_registrations,
)

LNM = ComponentSpec(
    name="lnm",
    spec=LNM_SPEC,
    host_file="/etc/usher/lnm.config",
    home_file=".usher/lnm.config",
    env_var="USHER_LNM_CONFIG",
)

USH = ComponentSpec(
    name="ush",
    spec=USH_SPEC,
    host_file="/etc/usher/ush.config",
    home_file=".usher/ush.config",
    env_var="USHER_USH_CONFIG",
)

# plusher, the XML-RPC gateway for Plush (usher.clients.plusher).
PLUSHER_SPEC = f"""
[plusher]
interface = string(default='127.0.0.1')
port = {_PORT.format(7393)}
ssl_cert_file = path(default=None)
ssl_key_file = path(default=None)
controller_host = string(default='localhost')
controller_port = {_PORT.format(7390)}
controller_tls_name = string(default=None)
ssl_ca_file = path(default='/etc/usher/ca_cert.pem')
gateway_cert_file = path(default=None)
gateway_key_file = path(default=None)
call_timeout = float(gt=0, default=60)
session_idle_timeout = float(gt=0, default=600)
max_sessions = integer(min=1, default=1000)
ready_timeout = float(gt=0, default=600)
request_retention = float(gt=0, default=3600)
callback_hosts = list(default=list())
max_request_bytes = integer(min=1024, default=1048576)
allow_plain_http = boolean(default=False)
upcall_attempts = integer(min=1, default=5)
upcall_initial_delay = float(gt=0, default=1)
upcall_max_delay = float(gt=0, default=60)
upcall_timeout = float(gt=0, default=30)
address_args = list(default=list('ip', 'ip_address', 'address'))
log_file = path(default=None)
log_level = {_LOG_LEVEL}
pid_file = path(default=None)
"""

PLUSHER = ComponentSpec(
    name="plusher",
    spec=PLUSHER_SPEC,
    host_file="/etc/usher/plusher.config",
    home_file=".usher/plusher.config",
    env_var="USHER_PLUSHER_CONFIG",
)

# usherweb, the web interface and REST API (usher.clients.web).
WEB_SPEC = f"""
[web]
interface = string(default='127.0.0.1')
port = {_PORT.format(7394)}
ssl_cert_file = path(default=None)
ssl_key_file = path(default=None)
allow_plain_http = boolean(default=False)
controller_host = string(default='localhost')
controller_port = {_PORT.format(7390)}
controller_tls_name = string(default=None)
ssl_ca_file = path(default='/etc/usher/ca_cert.pem')
gateway_cert_file = path(default=None)
gateway_key_file = path(default=None)
call_timeout = float(gt=0, default=60)
session_idle_timeout = float(gt=0, default=1800)
session_max_age = float(gt=0, default=43200)
max_sessions = integer(min=1, default=1000)
max_streams_per_session = integer(min=1, default=8)
max_request_bytes = integer(min=1024, default=65536)
stream_keepalive = float(gt=0, default=15)
stream_coalesce = float(min=0, default=0.1)
stream_buffer_bytes = integer(min=65536, default=8388608)
static_dir = path(default=None)
log_file = path(default=None)
log_level = {_LOG_LEVEL}
pid_file = path(default=None)
"""

WEB = ComponentSpec(
    name="web",
    spec=WEB_SPEC,
    host_file="/etc/usher/web.config",
    home_file=".usher/web.config",
    env_var="USHER_WEB_CONFIG",
)

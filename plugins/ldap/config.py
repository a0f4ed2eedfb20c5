"""The options of an LDAP configuration file (``etc/plugins/ldap.config``).

One file serves the LDAP plugin (``usher.plugins.ldap``), the controller's
``ldap`` authentication module (``[ctrl] ldap_config``), ``usher user
--ldap-config`` and the filesystem plugin's ``uid_source = ldap``; every
option is documented in the sample file.

``call_timeout`` bounds each directory call (connect, then each answer);
it is not the plugin's per-event ``timeout``, which every plugin
configuration has (``usher.controller.plugins.COMMON_OPTIONS``).
"""

DEFAULT_ORDER = 70
DEFAULT_CONFIG_FILE = "/etc/usher/plugins/ldap.config"
DEFAULT_URL = "ldap://127.0.0.1:389"
DEFAULT_BASE_DN = "dc=usher,dc=local"

CONFIG_SPEC = f"""
order = integer(default={DEFAULT_ORDER})
url = string(default='{DEFAULT_URL}')
base_dn = string(default='{DEFAULT_BASE_DN}')
bind_dn = string(default=None)
bind_password_file = path(default='/etc/usher/ldap.password')
call_timeout = float(gt=0, default=5.0)
ca_file = path(default=None)
admin_group = string(default='usher-admins')
uid_min = integer(min=1, default=10000)
default_gid = integer(min=0, default=100)
home_template = string(default='/home/{{user}}')
login_shell = string(default='/bin/bash')
cluster_admin_gid = integer(min=0, default=10000)
cluster_branch_policy = option('delete', 'keep', default='delete')
reconcile_interval = float(gt=0, default=60.0)
"""

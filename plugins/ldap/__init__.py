"""LDAP: Usher users, authentication and per-cluster branches in an OpenLDAP directory.

(Placeholder until the plugin itself, written on branch s13-ldapb, replaces
this module; the options are those of ``usher.plugins.ldap.config``.)
"""

from usher.plugins.ldap.config import CONFIG_SPEC, DEFAULT_ORDER  # noqa: F401

"""LDAP: Usher users, authentication and per-cluster branches in an OpenLDAP directory.

(Placeholder: the plugin itself is written on branch s13-ldapb.)
"""

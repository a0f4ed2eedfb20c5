"""``usher ldap acl --base DN [--ldif]``: print Usher's slapd access rules.

The rules come from ``usher.plugins.ldap.acl`` (the one source; the files in
``etc/ldap/`` are its output for ``dc=usher,dc=local``): slapd.conf
``access to`` directives, or with ``--ldif`` an ``olcAccess`` change for a
cn=config server (``ldapmodify -Y EXTERNAL -H ldapi:/// -f FILE``).
"""

from __future__ import annotations

from usher.errors import InvalidRequest


def _acl(args, context) -> int:
    from usher.plugins.ldap import acl
    try:
        text = (acl.olc_ldif(args.base, args.database) if args.ldif
                else acl.slapd_conf(args.base))
    except ValueError as exc:
        raise InvalidRequest(f"--base: {exc}") from None
    print(text, end="")
    return 0


def register_ldap_commands(subparsers) -> None:
    ldap = subparsers.add_parser("ldap", help="the LDAP directory's access rules")
    actions = ldap.add_subparsers(dest="action", required=True, metavar="ACTION")
    acl_parser = actions.add_parser(
        "acl", help="print the slapd access rules for a base DN",
        description=__doc__.split("\n\n", 1)[1])
    acl_parser.add_argument("--base", metavar="DN", default="dc=usher,dc=local",
                            help="the directory's base DN (default dc=usher,dc=local)")
    acl_parser.add_argument("--ldif", action="store_true",
                            help="cn=config (olcAccess) form instead of slapd.conf")
    acl_parser.add_argument("--database", metavar="DN", default="olcDatabase={1}mdb,cn=config",
                            help="with --ldif: the database entry to change "
                                 "(default olcDatabase={1}mdb,cn=config)")
    acl_parser.set_defaults(handler=_acl)

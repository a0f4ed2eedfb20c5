"""The ``usher`` administration command.

    usher user add NAME [--admin] [--password-stdin] [--passwd-file F | --ldap-config F]
    usher user passwd NAME [--password-stdin] [--passwd-file F | --ldap-config F]
    usher user del NAME [--passwd-file F | --ldap-config F]
    usher user list [--passwd-file F | --ldap-config F]
    usher ca init [--dir D] [--force] [--cn CN] [--days N] [--key-type ec|rsa]
    usher cert issue --controller|--lnm|--gateway NAME [--dir D] [--out D]
                          [--hostname H]... [--ip IP]... [--days N]
                          [--key-type ec|rsa] [--force]
    usher cert bundle --lnm NAME [--controller-host H] [--controller-port P]
                      [--libvirt-uri URI] [--host-dir D] [--dir D] (--out DIR | --tar FILE)
                                                  (usher.cmd_bundle)
    usher ipam subnet|range|free|who|leases ...   (usher.cmd_ipam)
    usher report usage --since DATE [--until DATE] [--by owner|cluster|owner,cluster]
                                                  (usher.cmd_report)
    usher ldap acl [--base DN] [--ldif]           (usher.cmd_ldap)
    usher completion bash|zsh [--program usher|ush]   (usher.completion)

Exit status: 0 on success, 2 on usage errors, 1 on any other error; errors
are printed to stderr as ``usher: error: ...``.

Subcommands are added by registration functions (see ``SUBCOMMANDS``); each
takes the top-level argparse subparsers object, adds its parser(s) and sets a
``handler(args, context) -> int`` default on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass as getpass_module
import sys
from collections.abc import Callable
from typing import TextIO

from usher import errors, passwdfile, pki
from usher.cmd_ipam import register_ipam_commands
from usher.cmd_ldap import register_ldap_commands
from usher.cmd_report import register_report_commands
from usher.cliargs import UsageError, positive_int
from usher.errors import InvalidRequest, UsherError

PROG = "usher"


@dataclasses.dataclass
class CommandContext:
    """What a subcommand handler may use besides its parsed arguments."""

    stdin: TextIO
    getpass: Callable[[str], str]
    bcrypt_rounds: int


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# -- usher user ----------------------------------------------------------------

def _read_new_password(args, context: CommandContext) -> str:
    if args.password_stdin:
        line = context.stdin.readline()
        if not line:
            raise InvalidRequest("no password on standard input")
        return line.rstrip("\r\n")
    first = context.getpass("New password: ")
    second = context.getpass("Retype new password: ")
    if first != second:
        raise InvalidRequest("the passwords do not match; nothing changed")
    return first


def _existing_users(path) -> dict:
    try:
        return passwdfile.load(path)
    except UsherError:
        # The edit itself will report a missing or broken file precisely.
        return {}


def _user_add(args, context: CommandContext) -> int:
    passwdfile.validate_username(args.name)
    # Checked before prompting so nobody types a password for nothing;
    # add_user checks again under the file lock.
    if args.name in _existing_users(args.passwd_file):
        raise InvalidRequest(f"user {args.name!r} already exists in {args.passwd_file}")
    password = _read_new_password(args, context)
    role = "admin" if args.admin else None
    passwdfile.add_user(args.passwd_file, args.name, password, role,
                        rounds=context.bcrypt_rounds)
    print(f"Added user {args.name}" + (" (admin)" if role else "")
          + f" to {args.passwd_file}")
    return 0


def _user_passwd(args, context: CommandContext) -> int:
    passwdfile.validate_username(args.name)
    if args.name not in passwdfile.load(args.passwd_file):
        raise InvalidRequest(f"no user {args.name!r} in {args.passwd_file}")
    password = _read_new_password(args, context)
    passwdfile.set_password(args.passwd_file, args.name, password, rounds=context.bcrypt_rounds)
    print(f"Changed the password of {args.name}")
    return 0


def _user_del(args, context: CommandContext) -> int:
    passwdfile.delete_user(args.passwd_file, args.name)
    print(f"Deleted user {args.name} from {args.passwd_file}")
    return 0


def _user_list(args, context: CommandContext) -> int:
    for entry in passwdfile.load(args.passwd_file).values():
        print(f"{entry.username}\t{entry.role}" if entry.role else entry.username)
    return 0


def _or_ldap(file_handler, ldap_action):
    """The handler of a user subcommand: the password file, or with
    ``--ldap-config`` the directory (``usher.cmd_user_ldap``)."""
    def handler(args, context: CommandContext) -> int:
        if args.ldap_config:
            from usher import cmd_user_ldap
            return getattr(cmd_user_ldap, ldap_action)(args, context, _read_new_password)
        return file_handler(args, context)
    return handler


def register_user_commands(subparsers) -> None:
    file_option = _ArgumentParser(add_help=False)
    file_option.add_argument(
        "--passwd-file", metavar="F", default=passwdfile.DEFAULT_PASSWD_FILE,
        help=f"the password file (default {passwdfile.DEFAULT_PASSWD_FILE})")
    file_option.add_argument(
        "--ldap-config", metavar="F", default=None,
        help="manage the users of the LDAP directory this ldap.config names instead of the "
             "password file (binds as its service account)")
    password_option = _ArgumentParser(add_help=False)
    password_option.add_argument(
        "--password-stdin", action="store_true",
        help="read the password from the first line of standard input instead of prompting")

    user = subparsers.add_parser("user", help="manage Usher users (the password file, or LDAP)")
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser("add", parents=[file_option, password_option], help="add a user")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--admin", action="store_true", help="give the user the admin role")
    add.set_defaults(handler=_or_ldap(_user_add, "user_add"))

    passwd = actions.add_parser("passwd", parents=[file_option, password_option],
                                help="change a user's password")
    passwd.add_argument("name", metavar="NAME")
    passwd.set_defaults(handler=_or_ldap(_user_passwd, "user_passwd"))

    delete = actions.add_parser("del", parents=[file_option], help="delete a user")
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(handler=_or_ldap(_user_del, "user_del"))

    listing = actions.add_parser("list", parents=[file_option],
                                 help="list users (name, then role if any)")
    listing.set_defaults(handler=_or_ldap(_user_list, "user_list"))


# -- usher ca / usher cert -------------------------------------------------------

def _ca_init(args, context: CommandContext) -> int:
    files = pki.init_ca(args.dir, args.cn, args.days, force=args.force, key_type=args.key_type)
    print(f"Created CA certificate {files.cert_path} and key {files.key_path}")
    return 0


def _cert_issue(args, context: CommandContext) -> int:
    files = pki.issue_cert(
        args.dir, args.name, args.out if args.out is not None else args.dir,
        role=args.role, hostnames=args.hostname, ips=args.ip, days=args.days,
        force=args.force, key_type=args.key_type)
    print(f"Issued {args.role} certificate {files.cert_path} and key {files.key_path}")
    if args.role == pki.ROLE_LNM:
        print(f"The controller accepts LNM {args.name} once [ctrl] lnm_names allows it")
        print(f"(For a host, `usher cert bundle --lnm {args.name}` makes its files named "
              "as lnm.config expects: usherlnm_cert.pem, usherlnm_key.pem, ca_cert.pem.)")
    return 0


def register_pki_commands(subparsers) -> None:
    ca_dir_option = _ArgumentParser(add_help=False)
    ca_dir_option.add_argument(
        "--dir", metavar="D", default=pki.DEFAULT_CA_DIR,
        help=f"directory of ca_cert.pem and ca_key.pem (default {pki.DEFAULT_CA_DIR})")
    ca_dir_option.add_argument("--key-type", choices=pki.KEY_TYPES, default="ec",
                               help="ECDSA P-256 (default) or RSA 2048")

    ca = subparsers.add_parser("ca", help="manage the site certificate authority")
    ca_actions = ca.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = ca_actions.add_parser("init", parents=[ca_dir_option], help="create the site CA")
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA (certificates it issued stop working)")
    init.add_argument("--cn", default="Usher CA", help="the CA's common name")
    init.add_argument("--days", type=positive_int, default=3650, help="validity (default 3650)")
    init.set_defaults(handler=_ca_init)

    cert = subparsers.add_parser("cert", help="issue certificates signed by the site CA")
    cert_actions = cert.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue = cert_actions.add_parser(
        "issue", parents=[ca_dir_option],
        help="issue NAME_cert.pem and NAME_key.pem for a role")
    roles = issue.add_mutually_exclusive_group(required=True)
    roles.add_argument("--controller", dest="role", action="store_const",
                       const=pki.ROLE_CONTROLLER,
                       help="the controller's certificate: NAME and every --hostname/--ip "
                            "clients and LNMs dial it as")
    roles.add_argument("--lnm", dest="role", action="store_const", const=pki.ROLE_LNM,
                       help="an LNM's certificate: NAME is the LNM's name (and nothing "
                            "else); allow it in the controller's [ctrl] lnm_names. For a "
                            "host's LNM use `usher cert bundle`")
    roles.add_argument("--gateway", dest="role", action="store_const",
                       const=pki.ROLE_GATEWAY,
                       help="a gateway's (plusher's) certificate: HTTPS for NAME and every "
                            "--hostname/--ip, and trusted as a gateway by the controller")
    issue.add_argument("name", metavar="NAME", help="common name and first DNS name")
    issue.add_argument("--out", metavar="D", default=None,
                       help="where to write the files (default: the CA directory)")
    issue.add_argument("--hostname", metavar="H", action="append", default=[],
                       help="another DNS name for the certificate (repeatable; not for "
                            "--lnm)")
    issue.add_argument("--ip", metavar="IP", action="append", default=[],
                       help="an IP address for the certificate (repeatable; not for --lnm)")
    issue.add_argument("--days", type=positive_int, default=825, help="validity (default 825)")
    issue.add_argument("--force", action="store_true", help="replace existing files")
    issue.set_defaults(handler=_cert_issue)

    from usher import cmd_bundle
    bundle = cert_actions.add_parser(
        "bundle", parents=[ca_dir_option],
        help="a new host's LNM files: certificate, key, CA and lnm.config, to copy there",
        description="Make what a host's LNM needs, named as lnm.config expects: "
                    f"{', '.join(cmd_bundle.FILES)} (the key mode 600), into a directory "
                    "(mode 700) or a tar file to unpack into the host's /etc/usher.")
    bundle.add_argument("--lnm", dest="name", metavar="NAME", required=True,
                        help="the LNM's name (its certificate's CN); allow it in the "
                             "controller's [ctrl] lnm_names")
    bundle.add_argument("--controller-host", "--hostname", metavar="H", default=None,
                        help="the controller's host name or address as the LNM dials it, "
                             "one of the names of its certificate (default: this host's "
                             "FQDN)")
    bundle.add_argument("--controller-port", metavar="P", type=positive_int,
                        default=cmd_bundle.DEFAULT_LNM_PORT,
                        help=f"the controller's lnm_port (default {cmd_bundle.DEFAULT_LNM_PORT})")
    bundle.add_argument("--libvirt-uri", metavar="URI", default=None,
                        help="the host's hypervisor, e.g. qemu:///system (default: left for "
                             "the administrator to set in lnm.config)")
    bundle.add_argument("--host-dir", metavar="D", default=cmd_bundle.DEFAULT_HOST_DIR,
                        help="where the files will be on the host, as written into lnm.config "
                             f"(default {cmd_bundle.DEFAULT_HOST_DIR})")
    where = bundle.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", default=None,
                       help="write the files into DIR (created, mode 700)")
    where.add_argument("--tar", metavar="FILE", default=None,
                       help="write them into the tar file FILE (mode 600)")
    bundle.add_argument("--days", type=positive_int, default=825,
                        help="the certificate's validity (default 825)")
    bundle.add_argument("--force", action="store_true", help="replace existing files")
    bundle.set_defaults(handler=cmd_bundle.cert_bundle)


# -- the command -----------------------------------------------------------------

# Registration functions of the top-level subcommands, in help order.
def register_sandbox_commands(subparsers):
    from usher import sandbox
    parser = subparsers.add_parser(
        "sandbox", help="run a whole Usher system on this machine (libvirt test driver)",
        description=sandbox.__doc__)
    sandbox.add_arguments(parser)
    parser.set_defaults(handler=lambda args, context: sandbox.run(args))


def register_completion_commands(subparsers):
    parser = subparsers.add_parser(
        "completion", help="print the shell completion script of usher or ush",
        description="Print a completion script: `usher completion bash > "
        "/usr/share/bash-completion/completions/usher` (ush: `ush --completion bash`).")
    parser.add_argument("shell", choices=("bash", "zsh"))
    parser.add_argument("--program", choices=("usher", "ush"), default="usher",
                        help="the program to complete (default usher)")
    parser.set_defaults(handler=_completion)


def _completion(args, context: CommandContext) -> int:
    from usher import completion
    parser = completion.ush_parser() if args.program == "ush" else build_parser()
    sys.stdout.write(completion.script(parser, args.shell))
    return 0


SUBCOMMANDS: tuple[Callable, ...] = (
    register_user_commands,
    register_pki_commands,
    register_ipam_commands,
    register_report_commands,
    register_ldap_commands,
    register_sandbox_commands,
    register_completion_commands,
)


def build_parser(subcommands=SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=PROG, description="Usher administration.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in subcommands:
        register(subparsers)
    return parser


def main(argv=None, *, stdin: TextIO | None = None,
         getpass: Callable[[str], str] = getpass_module.getpass,
         bcrypt_rounds: int = passwdfile.DEFAULT_ROUNDS,
         subcommands=SUBCOMMANDS) -> int:
    """Run the ``usher`` command; -> exit status. Keyword arguments are for tests."""
    parser = build_parser(subcommands)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    context = CommandContext(stdin=stdin if stdin is not None else sys.stdin,
                             getpass=getpass, bcrypt_rounds=bcrypt_rounds)
    try:
        return args.handler(args, context)
    # The exit statuses of usher.errors.EXIT_STATUSES, as for ush (a refused
    # or failed administrative step is 1).
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        _error(str(exc))
        return errors.EXIT_USAGE
    except UsherError as exc:
        _error(str(exc))
        return errors.EXIT_FAILED
    except EOFError:
        _error("no password entered")
        return errors.EXIT_FAILED
    except OSError as exc:
        _error(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        return errors.EXIT_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        _error("interrupted")
        return errors.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""``usher user ... --ldap-config FILE``: the users in the LDAP directory.

The same subcommands, output and errors as the password-file back end
(``usher.admin``), on the directory of an ``ldap.config`` file (the one the
controller's ``ldap`` authentication module and the LDAP plugin read). The
command binds as the service account (``bind_dn`` with the password in
``bind_password_file``); passwords are stored as salted hashes. ``--admin``
puts the user in the ``admin_group`` (the Usher ``admin`` role).
"""

from __future__ import annotations

from usher.errors import InvalidRequest
from usher.passwdfile import validate_username


def _directory(args):
    from usher.plugins.ldap.directory import load_directory
    return load_directory(args.ldap_config)


def user_add(args, context, read_new_password) -> int:
    validate_username(args.name)
    directory = _directory(args)
    # Checked before prompting so nobody types a password for nothing;
    # add_user checks again.
    if directory.user_exists(args.name):
        raise InvalidRequest(f"user {args.name!r} already exists in {directory.config.url}")
    password = read_new_password(args, context)
    uid_number = directory.add_user(args.name, password, admin=args.admin)
    print(f"Added user {args.name}" + (" (admin)" if args.admin else "")
          + f" to {directory.config.url} (uidNumber {uid_number})")
    return 0


def user_passwd(args, context, read_new_password) -> int:
    validate_username(args.name)
    directory = _directory(args)
    if not directory.user_exists(args.name):
        raise InvalidRequest(f"no user {args.name!r} in {directory.config.url}")
    password = read_new_password(args, context)
    directory.set_password(args.name, password)
    print(f"Changed the password of {args.name}")
    return 0


def user_del(args, context, read_new_password) -> int:
    validate_username(args.name)
    directory = _directory(args)
    directory.delete_user(args.name)
    print(f"Deleted user {args.name} from {directory.config.url}")
    return 0


def user_list(args, context, read_new_password) -> int:
    for name, role in _directory(args).list_users():
        print(f"{name}\t{role}" if role else name)
    return 0

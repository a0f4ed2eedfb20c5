"""Usher's VM naming scheme: ``<requested name>.<owner>.<domain>``.

``start -n sneetch -c 3`` by user ``alice`` in domain ``usher.local`` makes
``1.sneetch.alice.usher.local`` … ``3.sneetch.alice.usher.local``; the cluster
of such a VM is ``sneetch``. A VM whose name ends with the domain is managed
by Usher; any other is unmanaged.
"""

import re

from usher.errors import InvalidRequest, PermissionDenied

# Matched whole (fullmatch): "$" would let a label end in a newline.
LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
DEFAULT_CLUSTER = "default"
MAX_NAME = 253


def check_label(label, what="name"):
    if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
        raise InvalidRequest(
            f"invalid {what} {label!r}: use lower-case letters, digits and "
            "hyphens (a DNS label, at most 63 characters)")
    return label


def check_user(user):
    if not isinstance(user, str) or not USER_RE.fullmatch(user):
        raise InvalidRequest(f"invalid user name {user!r}")
    return user


def check_short_name(short):
    """A requested name: one or more DNS labels separated by dots."""
    if not isinstance(short, str) or not short:
        raise InvalidRequest("empty VM name")
    for label in short.split("."):
        check_label(label, "VM name label")
    return short


def qualify(name, owner, domain):
    """Return the full name of ``name`` for ``owner``.

    Accepts a short name (``1.sneetch``) or a full one; refuses a full name
    that belongs to another owner.
    """
    if not isinstance(name, str):
        raise InvalidRequest(f"VM name must be a string, not {type(name).__name__}")
    name = name.strip().lower().rstrip(".")
    suffix = f".{owner}.{domain}"
    if name.endswith(suffix):
        short = name[: -len(suffix)]
    elif name.endswith("." + domain):
        raise PermissionDenied(f"{name} does not belong to {owner}")
    else:
        short = name
    check_short_name(short)
    full = short + suffix
    if len(full) > MAX_NAME:
        raise InvalidRequest(f"VM name {full!r} is too long")
    return full


def is_managed(name, domain):
    return name.endswith("." + domain)


def split(name, domain):
    """-> (short name, owner) of a managed VM name, or None if unmanaged."""
    if not is_managed(name, domain):
        return None
    rest = name[: -len(domain) - 1]
    short, dot, owner = rest.rpartition(".")
    if not dot or not short or not USER_RE.match(owner):
        return None
    return short, owner


def cluster_of(short):
    """The virtual cluster a short name implies: ``3.sneetch`` -> sneetch."""
    first, dot, rest = short.partition(".")
    return rest if dot else DEFAULT_CLUSTER


def short_name(name, domain):
    parts = split(name, domain)
    return parts[0] if parts else name


# A VM's name on a host as an LNM may send it to the controller: DNS-style
# labels of letters, digits, hyphens and underscores, dot-separated, at most
# MAX_NAME characters (libvirt allows more: the LNM leaves such domains out).
_HOST_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOST_VM_NAME_RE = re.compile(rf"^{_HOST_LABEL}(\.{_HOST_LABEL})*$")


def is_host_vm_name(name):
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME
            and HOST_VM_NAME_RE.fullmatch(name) is not None)

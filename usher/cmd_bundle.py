"""``usher cert bundle``: everything a new host's LNM needs, made on the
controller (where the site CA is), ready to copy to the host.

    usher cert bundle --lnm NAME [--controller-host H] [--controller-port P]
                      [--libvirt-uri URI] [--host-dir D] [--dir CA] (--out DIR | --tar FILE)

The bundle holds the node's files under the names every LNM uses (the
defaults of lnm.config, ``usher.settings.LNM``):

    usherlnm_cert.pem   the LNM's certificate (role lnm, CN = NAME)
    usherlnm_key.pem    its private key (mode 600)
    ca_cert.pem         the site CA's certificate
    lnm.config          name, controller address and these files' paths on the
                        host (--host-dir, default /etc/usher); libvirt_uri as
                        given, else left for the administrator (the LNM
                        refuses to start until it is set)

``--out DIR`` writes them into DIR (created with mode 700; an existing DIR
must be a directory of the user's with mode 700, not a symbolic link); ``--tar FILE``
into a tar file (mode 600) to unpack on the host with
``tar -xf FILE -C /etc/usher``. The declarations are in ``usher.admin``.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
from pathlib import Path

from usher import pki
from usher.errors import InvalidRequest

CERT_FILE = "usherlnm_cert.pem"
KEY_FILE = "usherlnm_key.pem"
CA_FILE = pki.CA_CERT_FILE
CONFIG_FILE = "lnm.config"
FILES = (CERT_FILE, KEY_FILE, CA_FILE, CONFIG_FILE)
DEFAULT_HOST_DIR = "/etc/usher"
DEFAULT_LNM_PORT = 7391

_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./+@-]*")
# A libvirt URI as written in lnm.config: one printable word, no comment.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]*")


def _check_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(host) or ".." in host:
        raise InvalidRequest(f"--controller-host {host!r}: not a host name or IP address")
    return host


def _config_text(args, host_dir: str, controller_host: str) -> str:
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.libvirt_uri:
        hypervisor = f"""\
# The hypervisor this LNM manages.
libvirt_uri = {args.libvirt_uri}"""
    else:
        hypervisor = """\
# SET THIS: the hypervisor this LNM manages, e.g. qemu:///system (KVM/QEMU
# on this host) or xen:///system. Until it is set the LNM refuses to start.
libvirt_uri = None"""
    return f"""\
# LNM {args.name}: made by `usher cert bundle` on {socket.gethostname()}, {made}.
# Every option is explained in {host_dir}/lnm.config.orig (install.sh lnm
# installs it); only what this host needs is here.
[lnm]
name = {args.name}

# The controller (its lnm_interface and lnm_port; the name must be one of its
# certificate's). Its [ctrl] lnm_names must allow {args.name}.
controller_host = {controller_host}
controller_port = {args.controller_port}

# This LNM's certificate and key, and the site CA (all from the bundle).
ssl_cert_file = {host_dir}/{CERT_FILE}
ssl_key_file = {host_dir}/{KEY_FILE}
ssl_ca_file = {host_dir}/{CA_FILE}

{hypervisor}

# Where the controller's recovery announcement reaches this LNM after a
# controller restart: this host's address on the controller's network
# (loopback by default; the LNM comes back on its own anyway, only later).
# recovery_interface = 10.0.0.47
"""


def _check(args) -> tuple[str, str]:
    host_dir = args.host_dir.rstrip("/") or "/"
    if not _PLAIN_PATH.fullmatch(host_dir):
        raise InvalidRequest(f"--host-dir {args.host_dir!r}: an absolute path of letters, "
                             "digits and _ . / + @ - only")
    if args.libvirt_uri is not None and not _URI.fullmatch(args.libvirt_uri):
        raise InvalidRequest(f"--libvirt-uri {args.libvirt_uri!r}: not a libvirt URI "
                             "(e.g. qemu:///system)")
    controller_host = _check_host(args.controller_host or socket.getfqdn())
    if args.out is None and args.tar is None:
        raise InvalidRequest("name where the bundle goes: --out DIR or --tar FILE")
    return host_dir, controller_host


def _make(args, directory: Path, host_dir: str, controller_host: str) -> None:
    """The bundle's files in ``directory`` (which exists and is ours)."""
    issued = pki.issue_cert(args.dir, args.name, directory, role=pki.ROLE_LNM,
                            days=args.days, key_type=args.key_type, force=True)
    os.replace(issued.cert_path, directory / CERT_FILE)
    os.replace(issued.key_path, directory / KEY_FILE)      # 0600 already
    shutil.copyfile(Path(args.dir) / pki.CA_CERT_FILE, directory / CA_FILE)
    (directory / CONFIG_FILE).write_text(_config_text(args, host_dir, controller_host),
                                         encoding="utf-8")
    for name in (CERT_FILE, CA_FILE, CONFIG_FILE):
        os.chmod(directory / name, 0o644)


def _into_directory(args, host_dir, controller_host) -> Path:
    out = Path(args.out)
    try:
        st = out.lstat()                    # a symlink is not followed
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise InvalidRequest(f"--out {out}: is a symbolic link: name the directory itself")
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidRequest(f"--out {out}: exists and is not a directory")
        if st.st_uid != os.geteuid():
            raise InvalidRequest(f"--out {out}: exists and belongs to another user (a key "
                                 "goes there): name a new directory")
        if st.st_mode & 0o077:
            raise InvalidRequest(f"--out {out}: exists and others may read it (a key goes "
                                 "there): name a new directory")
        present = [name for name in FILES if (out / name).exists()]
        if present and not args.force:
            raise InvalidRequest(f"{out} already holds {', '.join(present)}; nothing "
                                 "changed (--force replaces them)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Made beside it first (mkdtemp: mode 700, ours): a refused name or a CA
    # problem leaves nothing, and a new --out is this directory renamed into
    # place, never one someone else made meanwhile.
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    try:
        _make(args, tmp, host_dir, controller_host)
        if st is None:
            try:
                os.rename(tmp, out)
            except OSError:             # not empty, a file or a link now
                raise InvalidRequest(f"--out {out}: appeared while the bundle was made; "
                                     "nothing changed") from None
        else:
            for name in FILES:
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _into_tar(args, host_dir, controller_host) -> Path:
    target = Path(args.tar)
    if target.exists() and not args.force:
        raise InvalidRequest(f"{target} exists; nothing changed (--force replaces it)")
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=target.parent) as tmp:
        _make(args, Path(tmp), host_dir, controller_host)
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in FILES:
                info = tar.gettarinfo(str(Path(tmp) / name), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                with open(Path(tmp) / name, "rb") as f:
                    tar.addfile(info, f)
        partial = Path(tmp) / "bundle.tar"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data.getvalue())
        os.replace(partial, target)
    return target


def cert_bundle(args, context) -> int:
    """The ``usher cert bundle`` handler."""
    host_dir, controller_host = _check(args)
    if args.tar is not None:
        where = _into_tar(args, host_dir, controller_host)
        copy = (f"scp {where} root@HOST:  then on the host: "
                f"tar -xf {where.name} -C {host_dir}")
    else:
        where = _into_directory(args, host_dir, controller_host)
        copy = f"scp -p {where}/* root@HOST:{host_dir}/"
    print(f"Made the bundle of LNM {args.name} in {where}: {', '.join(FILES)}")
    print(f"On the host, once Usher is installed (sh initscripts/install.sh lnm): {copy}")
    if not args.libvirt_uri:
        print(f"Then set libvirt_uri in {host_dir}/{CONFIG_FILE} (e.g. qemu:///system).")
    print(f"The controller accepts LNM {args.name} once [ctrl] lnm_names allows it.")
    return 0

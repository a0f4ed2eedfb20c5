"""Real hypervisors on one Debian machine: two libvirtd "hosts" and an Usher
system on top of them, for the end-to-end test and for trying things by hand.

What it builds (everything under one run directory, torn down by PID):

- network namespaces ``<tag>-ctl``, ``<tag>-h1`` and ``<tag>-h2``: a bridge in
  ``ctl`` (10.200.0.254/24) joins a veth from each host namespace
  (10.200.0.1/24 and 10.200.0.2/24). Every address lives inside these
  namespaces: nothing is added to the machine's own network.
- in each host namespace, a virtlogd and a libvirtd of their own: a private
  mount namespace binds the host's directories over /etc/libvirt,
  /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, and
  a passwd/group that has ``libvirt-qemu`` (Debian's libvirtd looks that user
  up before reading qemu.conf, and only libvirt-daemon-system, which pulls
  systemd, would create it). Each libvirtd has its own host_uuid (else
  libvirt refuses to migrate to "the same host"), listens for TCP on its
  address without authentication (fine inside private namespaces; see the
  README for real sites) and runs QEMU guests with software emulation.
- an Usher controller in ``ctl`` and one ``usherlnm`` per host namespace,
  reaching its libvirtd through the unix socket
  (``qemu+unix:///system?socket=...``) and offering
  ``qemu+tcp://10.200.0.X/system`` as its migration URI.
- a tiny guest from Debian packages: the kernel of ``linux-image-*-amd64``
  and an initramfs of ``busybox-static`` with ``evdev.ko`` and ``button.ko``,
  whose init starts ``acpid`` (so an ACPI shutdown powers it off) and then
  prints a counter on its serial console every second.

Command line (as root)::

    python -m tests.realhv.hosts prepare            # packages and the guest
    python -m tests.realhv.hosts up DIR             # hosts + Usher; prints how to use them
    python -m tests.realhv.hosts down DIR           # stop what `up` left running

Nothing here runs on the reactor: the test drives real processes.
"""

import argparse
import fcntl
import glob
import gzip
import hashlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Debian packages for QEMU under libvirtd, without systemd: the monolithic
# libvirtd, virsh, QEMU, busybox for the guest, ip for the namespaces.
PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients",
            "qemu-system-x86", "qemu-utils", "busybox-static", "iproute2")
KERNEL_METAPACKAGE = "linux-image-amd64"
# In load order (busybox insmod resolves no dependencies): the input and ACPI
# button drivers, then virtio-net (Debian builds virtio as modules).
GUEST_MODULES = ("kernel/drivers/input/evdev.ko", "kernel/drivers/acpi/button.ko",
                 "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
                 "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
                 "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                 "kernel/drivers/virtio/virtio_pci.ko", "kernel/net/core/failover.ko",
                 "kernel/drivers/net/net_failover.ko", "kernel/drivers/net/virtio_net.ko")
GUEST_CMDLINE = "console=ttyS0 quiet loglevel=3 panic=-1"

NETWORK_PREFIX = "10.200.0"
CONTROLLER_ADDRESS = f"{NETWORK_PREFIX}.254"
HOST_ADDRESSES = (f"{NETWORK_PREFIX}.1", f"{NETWORK_PREFIX}.2")
USHER_DOMAIN = "usher.test"
USHER_USER = "alice"
CLIENT_PORT, LNM_PORT, RECOVERY_PORT = 7390, 7391, 7392

# Markers the guest prints on its serial console.
BOOT_MARKER = "usher-guest: booted"
READY_MARKER = "usher-guest: acpid ready"
NETWORK_MARKER = "usher-guest: network "
# The page the guest's web server answers with: its address and MAC as it
# sees them.
GUEST_PAGE_PREFIX = "usher-guest "
TICK_PREFIX = "usher-guest: tick "

# The guest's /init. It prints BOOT_MARKER, loads the input, ACPI button and
# virtio-net drivers, starts acpid only once an input event device exists (an
# acpid started earlier watches nothing, and the power button would do
# nothing), configures eth0 from the address Usher put on the kernel command
# line (the Debian kernel has no CONFIG_IP_PNP, so the kernel ignores ip=;
# IPv6 comes as usher.ip6=/usher.gw6=), takes its host name from the same
# words (ip='s host field, usher.hostname=), answers HTTP on it with its
# address, MAC and host name, then counts forever; PID 1 must never exit.
GUEST_INIT = f"""#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp /var/run /var/log
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
echo "{BOOT_MARKER}"
for pass in 1 2; do
    for module in $(cat /lib/modules/order); do
        [ -d "/sys/module/$module" ] || insmod "/lib/modules/$module.ko" 2>/dev/null
    done
done
n=0
while ! ls /dev/input/event* >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -gt 200 ] && break; sleep 0.05
done
acpid -c /etc/acpi -l /var/log/acpid.log
echo "{READY_MARKER}"
ip4=; ip6=; gw6=; address=; name=
for word in $(cat /proc/cmdline); do
    case "$word" in
        ip=*) ip4="${{word#ip=}}" ;;
        usher.ip6=*) ip6="${{word#usher.ip6=}}" ;;
        usher.gw6=*) gw6="${{word#usher.gw6=}}" ;;
        usher.hostname=*) name="${{word#usher.hostname=}}" ;;
    esac
done
if [ -n "$ip4$ip6" ]; then
    n=0
    while [ ! -e /sys/class/net/eth0 ]; do
        n=$((n + 1)); [ $n -gt 200 ] && break; sleep 0.05
    done
    ip link set lo up
    ip link set eth0 up
    if [ -n "$ip4" ]; then
        # ip=<address>:<server>:<gateway>:<netmask>:<host>:<device>:<autoconf>
        IFS=:; set -- $ip4; unset IFS
        ifconfig "${{6:-eth0}}" "$1" netmask "$4" up
        [ -n "$3" ] && route add default gw "$3"
        [ -n "$5" ] && name="$5"
        address="$1"
    fi
    if [ -n "$ip6" ]; then
        ip -6 addr add "$ip6" dev eth0
        [ -n "$gw6" ] && ip -6 route add default via "$gw6"
        address="${{address:+$address }}${{ip6%/*}}"
    fi
    mkdir -p /www
    [ -n "$name" ] && hostname "$name"
    echo "{GUEST_PAGE_PREFIX}$address $(cat /sys/class/net/eth0/address) $(hostname)" \
        > /www/index.html
    httpd -p 80 -h /www
    echo "{NETWORK_MARKER}$(ip -o addr show dev eth0 | tr -s ' ' | tr '\\n' ';')"
fi
i=0
while true; do echo "{TICK_PREFIX}$i"; i=$((i + 1)); sleep 1; done
"""
# busybox acpid maps the power button to the action PWRF/00000080 and runs
# the file of that name under its configuration directory.
GUEST_POWER_BUTTON = "#!/bin/sh\nexec poweroff -f\n"

STOP_GRACE = 10.0
INITRD_KEEP = 24 * 3600.0    # seconds an unused initrd stays in the cache
# Wait for another apt/dpkg (another test run, unattended upgrades) to finish.
APT_LOCK_WAIT = "DPkg::Lock::Timeout=300"


class CannotRun(Exception):
    """This machine cannot run real hypervisors; the message says why."""


def log(message):
    print(f"[realhv] {message}", file=sys.stderr, flush=True)


def run(argv, *, check=True, capture=True, timeout=300, **kwargs):
    """subprocess.run with the output kept for error messages."""
    result = subprocess.run(argv, capture_output=capture, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, **kwargs)
    if check and result.returncode != 0:
        output = ((result.stdout or "") + (result.stderr or "")).strip()
        raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}: {output}")
    return result


# --- can this machine do it? -----------------------------------------------------

def why_not_runnable():
    """None if this machine can run the real-hypervisor test, else the reason."""
    if os.environ.get("USHER_REALHV", "").lower() in ("0", "no", "off", "skip"):
        return "USHER_REALHV is set to skip the real-hypervisor test"
    if not sys.platform.startswith("linux"):
        return "real hypervisors need Linux (network namespaces, QEMU)"
    if os.geteuid() != 0:
        return "real hypervisors need root (namespaces, libvirtd, packages)"
    if not shutil.which("apt-get") or not shutil.which("dpkg-query"):
        return "real hypervisors are set up from Debian packages: no apt-get here"
    if os.uname().machine != "x86_64":
        return "the test guest is an amd64 Debian kernel: this machine is not x86_64"
    return None


# --- packages ---------------------------------------------------------------------

def _missing_packages(packages):
    result = run(["dpkg-query", "-W", "-f", "${Package} ${Status}\n", *packages],
                 check=False)
    installed = {line.split()[0] for line in result.stdout.splitlines()
                 if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def _apt_env():
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive")


def install_packages():
    """Install what is missing of PACKAGES (no recommends: no systemd)."""
    missing = _missing_packages(PACKAGES)
    if not missing:
        return []
    log(f"installing Debian packages: {' '.join(missing)}")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
               "-o", APT_LOCK_WAIT, *missing]
    try:
        run(install, env=_apt_env(), timeout=900)
    except RuntimeError:
        # Package lists missing or stale (a fresh machine): update once.
        run(["apt-get", "update", "-qq", "-o", APT_LOCK_WAIT], env=_apt_env(), timeout=900)
        run(install, env=_apt_env(), timeout=900)
    return missing


# --- the guest ----------------------------------------------------------------------

def default_cache_dir():
    return os.environ.get("USHER_REALHV_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "usher", "realhv")


def _kernel_package():
    """The versioned kernel package linux-image-amd64 depends on."""
    for attempt in range(2):
        result = run(["apt-cache", "depends", KERNEL_METAPACKAGE], check=False)
        for line in result.stdout.splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "Depends:" and words[1].startswith("linux-image-"):
                return words[1]
        if attempt == 0:
            run(["apt-get", "update", "-qq", "-o", APT_LOCK_WAIT], env=_apt_env(),
                timeout=900)
    raise RuntimeError(f"apt knows no kernel package behind {KERNEL_METAPACKAGE}")


def _fetch_kernel(kernel_dir):
    """Download the kernel package; keep vmlinuz and the guest's modules."""
    package = _kernel_package()
    with tempfile.TemporaryDirectory(prefix="usher-kernel-") as scratch:
        log(f"downloading {package}")
        # As root, apt drops to _apt for downloads unless told not to.
        run(["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", package],
            cwd=scratch, timeout=900)
        deb = glob.glob(os.path.join(scratch, "*.deb"))[0]
        tree = os.path.join(scratch, "tree")
        os.makedirs(tree)
        run(["dpkg-deb", "-x", deb, tree], timeout=300)
        kernels = glob.glob(os.path.join(tree, "boot", "vmlinuz-*"))
        if len(kernels) != 1:
            raise RuntimeError(f"{package}: expected one /boot/vmlinuz-*, found {kernels}")
        partial = kernel_dir + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(os.path.join(partial, "modules"))
        shutil.copy(kernels[0], os.path.join(partial, "vmlinuz"))
        module_root = glob.glob(os.path.join(tree, "lib", "modules", "*"))[0]
        for relative in GUEST_MODULES:
            _copy_module(module_root, relative, os.path.join(partial, "modules"))
        with open(os.path.join(partial, "package"), "w") as f:
            f.write(package + "\n")
        shutil.rmtree(kernel_dir, ignore_errors=True)
        os.replace(partial, kernel_dir)


def _copy_module(module_root, relative, out_dir):
    base = os.path.join(module_root, relative)
    target = os.path.join(out_dir, os.path.basename(relative))
    if os.path.exists(base):
        shutil.copy(base, target)
    elif os.path.exists(base + ".xz"):
        # busybox insmod loads plain modules only.
        with lzma.open(base + ".xz") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        raise RuntimeError(f"the kernel package has no {relative} (nor .xz)")


def _build_initrd(kernel_dir, path):
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory(prefix="usher-initrd-") as root:
        for sub in ("bin", "lib/modules", "etc/acpi/PWRF", "proc", "sys", "dev"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        shutil.copy(busybox, os.path.join(root, "bin", "busybox"))
        os.symlink("busybox", os.path.join(root, "bin", "sh"))
        for module in glob.glob(os.path.join(kernel_dir, "modules", "*.ko")):
            shutil.copy(module, os.path.join(root, "lib", "modules"))
        _write(os.path.join(root, "lib", "modules", "order"), "".join(
            os.path.basename(m)[:-len(".ko")] + "\n" for m in GUEST_MODULES))
        _write(os.path.join(root, "init"), GUEST_INIT, 0o755)
        _write(os.path.join(root, "etc", "acpi", "PWRF", "00000080"), GUEST_POWER_BUTTON,
               0o755)
        files = []
        for directory, dirs, names in os.walk(root):
            for entry in sorted(dirs) + sorted(names):
                files.append(os.path.relpath(os.path.join(directory, entry), root))
        # Binary output: not through run(), which decodes text.
        archive = subprocess.run([busybox, "cpio", "-o", "-H", "newc"], cwd=root,
                                 input=("\n".join(files) + "\n").encode(),
                                 capture_output=True, timeout=60)
        if archive.returncode != 0:
            raise RuntimeError(f"busybox cpio failed: {archive.stderr.decode(errors='replace')}")
    with gzip.open(path + ".partial", "wb") as f:
        f.write(archive.stdout)
    os.replace(path + ".partial", path)


def _write(path, text, mode=0o644):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def build_guest(cache_dir=None):
    """The guest's kernel, initrd and command line, built once and cached:
    -> {"kernel": path, "initrd": path, "cmdline": str}."""
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    # Two runs at once (two test sessions) build it once.
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_guest_locked(cache_dir)


def _build_guest_locked(cache_dir):
    kernel_dir = os.path.join(cache_dir, "kernel")
    wanted = [os.path.join(kernel_dir, "modules", os.path.basename(m)) for m in GUEST_MODULES]
    if not os.path.exists(os.path.join(kernel_dir, "package")) or not all(
            os.path.exists(m) for m in wanted):
        _fetch_kernel(kernel_dir)
    # The initrd is named after what goes into it: editing the init script
    # (or changing the kernel) builds a new one.
    digest = hashlib.sha256()
    digest.update(GUEST_INIT.encode() + GUEST_POWER_BUTTON.encode()
                  + "\n".join(GUEST_MODULES).encode())
    for module in sorted(glob.glob(os.path.join(kernel_dir, "modules", "*.ko"))):
        digest.update(os.path.basename(module).encode() + str(os.path.getsize(module)).encode())
    initrd = os.path.join(cache_dir, f"initrd-{digest.hexdigest()[:16]}.gz")
    if not os.path.exists(initrd):
        log("building the guest initramfs")
        _build_initrd(kernel_dir, initrd)
    # Another checkout's run may be booting guests from its own initrd (an
    # older init) right now: only those unused for a day are removed.
    os.utime(initrd)
    for old in glob.glob(os.path.join(cache_dir, "initrd-*.gz")):
        if old != initrd and time.time() - os.path.getmtime(old) > INITRD_KEEP:
            os.unlink(old)
    return {"kernel": os.path.join(kernel_dir, "vmlinuz"), "initrd": initrd,
            "cmdline": GUEST_CMDLINE}


def prepare(cache_dir=None):
    """Packages and guest; -> the guest (see build_guest)."""
    reason = why_not_runnable()
    if reason:
        raise CannotRun(reason)
    install_packages()
    return build_guest(cache_dir)


# --- processes ----------------------------------------------------------------------

def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_pids(pids, grace=STOP_GRACE):
    """SIGTERM each PID, SIGKILL what is left after ``grace`` seconds."""
    pids = [p for p in pids if p and p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while True:
        for pid in pids:
            _reap(pid)
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in alive:
        for _ in range(100):
            _reap(pid)
            if not _alive(pid):
                break
            time.sleep(0.02)


def _start_time(pid):
    """The process's start time in clock ticks since boot (None if gone):
    with the PID, it names one process even after PIDs are reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def netns_pids(namespace):
    result = run(["ip", "netns", "pids", namespace], check=False)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


# --- the hosts --------------------------------------------------------------------------

_CAPABILITIES = ("qemu", "capabilities")   # under the cache directory

_LIBVIRT_DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
                 "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}

# Runs in a fresh mount namespace: bind the host's own directories and
# passwd/group over the machine's, then become the daemon.
_MOUNT_AND_EXEC = """set -e
dir="$1"; shift
for pair in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt \
            log:/var/log/libvirt cache:/var/cache/libvirt; do
    mount --bind "$dir/${pair%%:*}" "${pair#*:}"
done
mount --bind "$dir/passwd" /etc/passwd
mount --bind "$dir/group" /etc/group
exec "$@"
"""


def _passwd_with_qemu_user(directory):
    """passwd and group files for the daemons: the machine's, plus
    libvirt-qemu (and the kvm group) if they are missing."""
    with open("/etc/passwd") as f:
        passwd = f.read()
    with open("/etc/group") as f:
        group = f.read()
    if not passwd.endswith("\n"):
        passwd += "\n"
    if not group.endswith("\n"):
        group += "\n"
    users = {line.split(":")[0] for line in passwd.splitlines() if line}
    groups = {line.split(":")[0] for line in group.splitlines() if line}
    if "libvirt-qemu" not in groups:
        group += "libvirt-qemu:x:64055:\n"
    if "kvm" not in groups:
        group += "kvm:x:64056:\n"
    if "libvirt-qemu" not in users:
        passwd += "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
    _write(os.path.join(directory, "passwd"), passwd)
    _write(os.path.join(directory, "group"), group)


class Host:
    """One libvirtd "host": its directories, namespace and daemons."""

    def __init__(self, index, directory, namespace, address):
        self.index = index
        self.name = f"h{index}"
        self.dir = directory
        self.namespace = namespace
        self.address = address
        self.host_uuid = str(uuid.uuid4())
        self.virtlogd = None
        self.libvirtd = None

    @property
    def socket(self):
        return os.path.join(self.dir, "run", "libvirt-sock")

    @property
    def uri(self):
        """How processes outside the host (the LNM, virsh) reach its libvirtd."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def migration_uri(self):
        """How the other host's libvirtd reaches this one."""
        return f"qemu+tcp://{self.address}/system"

    def write_config(self):
        for sub in _LIBVIRT_DIRS:
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        _passwd_with_qemu_user(self.dir)
        etc = os.path.join(self.dir, "etc")
        _write(os.path.join(etc, "libvirtd.conf"), f"""\
# libvirtd of test host {self.name} (network namespace {self.namespace}).
listen_tls = 0
listen_tcp = 1
listen_addr = "{self.address}"
auth_tcp = "none"
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
unix_sock_ro_perms = "0770"
unix_sock_rw_perms = "0770"
host_uuid = "{self.host_uuid}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
""")
        _write(os.path.join(etc, "qemu.conf"), f"""\
# QEMU driver of test host {self.name}: guests run as root without a
# security driver, device namespaces or cgroups (two libvirtds on one
# machine would fight over the same machine cgroup).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
migration_host = "{self.address}"
""")
        _write(os.path.join(etc, "virtlogd.conf"), """\
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
""")

    def start(self, spawn, timeout=30.0, capabilities=None):
        """Start virtlogd, then libvirtd in the same mount namespace; does
        not wait for libvirtd (see wait_ready). ``capabilities``: a directory
        of QEMU capabilities cached by an earlier run (libvirtd checks them
        against the binaries and probes again if they are stale)."""
        self.write_config()
        if capabilities and os.path.isdir(capabilities):
            shutil.copytree(capabilities, os.path.join(self.dir, "cache", *_CAPABILITIES),
                            dirs_exist_ok=True)
        for target in _LIBVIRT_DIRS.values():
            os.makedirs(target, exist_ok=True)   # mount points must exist
        etc = os.path.join(self.dir, "etc")
        self.virtlogd = spawn(
            f"{self.name}-virtlogd",
            ["ip", "netns", "exec", self.namespace, "unshare", "--mount",
             "--propagation", "private", "sh", "-c", _MOUNT_AND_EXEC, "mount-and-exec",
             self.dir, "virtlogd", "-f", os.path.join(etc, "virtlogd.conf"),
             "-p", "/run/libvirt/virtlogd.pid"])
        # nsenter can join the mount namespace only once it has been made.
        wait_for(lambda: os.path.exists(os.path.join(self.dir, "run", "virtlogd-sock")),
                 timeout, f"virtlogd of {self.name} to listen")
        self.libvirtd = spawn(
            f"{self.name}-libvirtd",
            ["nsenter", f"--target={self.virtlogd.pid}", "--mount", "--net",
             "libvirtd", "--listen", "-f", os.path.join(etc, "libvirtd.conf"),
             "-p", "/run/libvirt/libvirtd.pid"])

    def wait_ready(self, timeout=60.0, capabilities=None):
        """Wait for libvirtd to answer; then keep its QEMU capabilities in
        ``capabilities`` for the next run (probing QEMU takes seconds)."""
        wait_for(self._answers, timeout, f"libvirtd of {self.name} to answer")
        probed = os.path.join(self.dir, "cache", *_CAPABILITIES)
        if capabilities and os.path.isdir(probed):
            partial = f"{capabilities}.{os.getpid()}.partial"
            shutil.copytree(probed, partial, dirs_exist_ok=True)
            shutil.rmtree(capabilities, ignore_errors=True)
            os.replace(partial, capabilities)

    def _answers(self):
        if self.libvirtd.poll() is not None:
            raise RuntimeError(f"libvirtd of {self.name} exited with {self.libvirtd.returncode}; "
                               f"see {self.dir}/log/libvirtd.log")
        return os.path.exists(self.socket) and self.virsh("version", check=False).returncode == 0

    def virsh(self, *args, check=True, timeout=120):
        return run(["virsh", "-q", "-c", self.uri, *args], check=check, timeout=timeout)


def wait_for(predicate, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """Two libvirtd hosts, a controller and two LNMs; see the module docstring.

    ``start()`` brings everything up; ``stop()`` takes everything down by PID
    (safe to call at any point, and again). The PIDs and namespaces are
    written to ``DIR/cluster.json`` as they are made, so ``stop_recorded(DIR)``
    cleans up after a process that died without stopping.
    """

    def __init__(self, directory, guest, *, tag=None, scan_interval=300, cache_dir=None,
                 ctrl_options="", lnm_options="", before_usher=None):
        self.dir = os.path.abspath(directory)
        self.cache_dir = os.path.abspath(cache_dir or default_cache_dir())
        self.guest = guest
        self.tag = tag or f"urh{os.getpid() % 100000}"
        self.ctl_namespace = f"{self.tag}-ctl"
        self.hosts = [Host(i + 1, os.path.join(self.dir, f"h{i + 1}"), f"{self.tag}-h{i + 1}",
                           address) for i, address in enumerate(HOST_ADDRESSES)]
        self.namespaces = []
        self.processes = {}
        self.scan_interval = scan_interval
        self.lnm_names = [f"lnm{i + 1}" for i in range(len(self.hosts))]
        self.password = uuid.uuid4().hex
        self.ush_config = os.path.join(self.dir, "ush.config")
        # More lines for the end of [ctrl] (plugin_dir, [[plugins]]; or a
        # function returning them, called once before_usher has run) and of
        # [lnm] (before its [[domain]]).
        self.ctrl_options = ctrl_options
        self.lnm_options = lnm_options
        # Called with the cluster once its namespaces exist, before Usher's
        # configuration is written and the controller starts: site services
        # (BIND, slapd, the database) that its plugins need in its namespace.
        self.before_usher = before_usher

    # -- bookkeeping --------------------------------------------------------------------

    def _record(self):
        state = {"namespaces": self.namespaces,
                 "pids": {name: [p.pid, _start_time(p.pid)]
                          for name, p in self.processes.items()}}
        _write(os.path.join(self.dir, "cluster.json"), json.dumps(state, indent=1))

    def spawn(self, name, argv):
        log_path = os.path.join(self.dir, "logs", f"{name}.log")
        with open(log_path, "ab") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.processes[name] = process
        self._record()
        return process

    def log_tail(self, name, lines=30):
        try:
            with open(os.path.join(self.dir, "logs", f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # -- network --------------------------------------------------------------------------

    def _add_namespace(self, name):
        if name in run(["ip", "netns", "list"]).stdout.split():
            raise RuntimeError(f"network namespace {name} already exists: another run with "
                               f"tag {self.tag} is active (or left over: "
                               f"python -m tests.realhv.hosts down DIR)")
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self._record()
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _make_network(self):
        ctl = self.ctl_namespace
        self._add_namespace(ctl)
        run(["ip", "-n", ctl, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", ctl, "addr", "add", f"{CONTROLLER_ADDRESS}/24", "dev", "br0"])
        run(["ip", "-n", ctl, "link", "set", "br0", "up"])
        for host in self.hosts:
            self._add_namespace(host.namespace)
            # Made inside the namespaces: neither end ever exists in the
            # machine's own network namespace.
            run(["ip", "-n", host.namespace, "link", "add", "eth0", "type", "veth",
                 "peer", "name", host.name, "netns", ctl])
            run(["ip", "-n", host.namespace, "addr", "add", f"{host.address}/24",
                 "dev", "eth0"])
            run(["ip", "-n", host.namespace, "link", "set", "eth0", "up"])
            run(["ip", "-n", ctl, "link", "set", host.name, "master", "br0", "up"])

    # Issue 15, the HA test: a network partition for real. The host's veth
    # end in the controller's namespace is its port on the "switch" (br0):
    # down, the host and its guests run on but nothing reaches it (nor the
    # other host); up again, the same addresses and routes come back.
    def cut_link(self, host):
        run(["ip", "-n", self.ctl_namespace, "link", "set", host.name, "down"])

    def heal_link(self, host):
        run(["ip", "-n", self.ctl_namespace, "link", "set", host.name, "up"])

    # -- Usher ------------------------------------------------------------------------------

    def _write_usher_config(self):
        from usher import passwdfile, pki
        pki_dir = os.path.join(self.dir, "pki")
        os.makedirs(pki_dir, exist_ok=True)
        pki.init_ca(pki_dir, common_name="Usher realhv test CA", force=True)
        pki.issue_cert(pki_dir, "usherctrl", pki_dir, role=pki.ROLE_CONTROLLER,
                       hostnames=["localhost"], ips=["127.0.0.1", CONTROLLER_ADDRESS],
                       force=True)
        for name in self.lnm_names:
            pki.issue_cert(pki_dir, name, pki_dir, role=pki.ROLE_LNM, force=True)
        passwd = os.path.join(self.dir, "passwd")
        if os.path.exists(passwd):
            os.unlink(passwd)
        passwdfile.add_user(passwd, USHER_USER, self.password, role="admin", rounds=4)
        ca = os.path.join(pki_dir, "ca_cert.pem")
        _write(os.path.join(self.dir, "ctrl.config"), f"""\
[ctrl]
domain = {USHER_DOMAIN}
client_interface = 127.0.0.1
client_port = {CLIENT_PORT}
lnm_interface = {CONTROLLER_ADDRESS}
lnm_port = {LNM_PORT}
lnm_names = {", ".join(self.lnm_names)}
ssl_key_file = {pki_dir}/usherctrl_key.pem
ssl_cert_file = {pki_dir}/usherctrl_cert.pem
ssl_ca_file = {ca}
state_dir = {self.dir}/ctrl-state
passwd_file = {passwd}
default_memory = 128
default_vcpus = 1
{self.ctrl_options() if callable(self.ctrl_options) else self.ctrl_options}""")
        for name, host in zip(self.lnm_names, self.hosts):
            _write(os.path.join(self.dir, f"{name}.config"), f"""\
# LNM {name} on test host {host.name} ({host.address}).
[lnm]
name = {name}
controller_host = {CONTROLLER_ADDRESS}
controller_port = {LNM_PORT}
controller_tls_name = usherctrl
ssl_key_file = {pki_dir}/{name}_key.pem
ssl_cert_file = {pki_dir}/{name}_cert.pem
ssl_ca_file = {ca}
libvirt_uri = {host.uri}
migration_uri = {host.migration_uri}
state_dir = {self.dir}/{name}-state
# Long on purpose: out-of-band changes must reach Usher through libvirt's
# lifecycle events, not through the periodic scan.
scan_interval = {self.scan_interval}
recovery_interface = {host.address}
recovery_port = {RECOVERY_PORT}
reconnect_initial_delay = 0.5
reconnect_max_delay = 5
{self.lnm_options}
  [[domain]]
  domain_type = qemu
  kernel = {self.guest['kernel']}
  initrd = {self.guest['initrd']}
  cmdline = {self.guest['cmdline']}
""")
        _write(self.ush_config, f"""\
[ush]
controller_host = 127.0.0.1
controller_port = {CLIENT_PORT}
controller_tls_name = localhost
ssl_ca_file = {ca}
username = {USHER_USER}
password = {self.password}
history_file = {self.dir}/ush_history
""")

    def _start_usher(self, timeout):
        python = [sys.executable, "-m"]
        self.spawn("usherctrl", ["ip", "netns", "exec", self.ctl_namespace, *python,
                                 "usher.controller.main", "--isolated", "--config",
                                 os.path.join(self.dir, "ctrl.config")])
        for name, host in zip(self.lnm_names, self.hosts):
            self.spawn(name, ["ip", "netns", "exec", host.namespace, *python,
                              "usher.lnm.main", "--isolated", "--config",
                              os.path.join(self.dir, f"{name}.config")])

        def connected():
            for name in ["usherctrl", *self.lnm_names]:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.processes[name].returncode}:\n"
                                       + self.log_tail(name))
            result = self.ush("list_lnm", check=False)
            if result.returncode != 0:
                return False
            lnms = json.loads(result.stdout)
            return sum(1 for lnm in lnms if lnm.get("connected")) == len(self.lnm_names)

        wait_for(connected, timeout, "both LNMs to connect to the controller", interval=0.3)

    def ush(self, *args, check=True, timeout=180):
        """Run ush one-shot (JSON output) in the controller's namespace."""
        argv = ["ip", "netns", "exec", self.ctl_namespace, sys.executable, "-m",
                "usher.clients.ush", "--config", self.ush_config, "--json", *args]
        return run(argv, check=check, timeout=timeout, cwd=REPO)

    def ush_popen(self, *args):
        argv = ["ip", "netns", "exec", self.ctl_namespace, sys.executable, "-m",
                "usher.clients.ush", "--config", self.ush_config, "--json", *args]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO)

    # -- whole ----------------------------------------------------------------------------

    def start(self, timeout=60.0):
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        self._make_network()
        capabilities = os.path.join(self.cache_dir, "qemu-capabilities")
        for host in self.hosts:
            host.start(self.spawn, timeout, capabilities)
        for host in self.hosts:
            host.wait_ready(timeout, capabilities)
        if self.before_usher is not None:
            self.before_usher(self)
        self._write_usher_config()
        self._start_usher(timeout)
        return self

    def stop(self):
        """Everything down, by PID: Usher first (so nothing reacts to guests
        vanishing), then every process left in each host namespace (QEMU,
        libvirtd, virtlogd), then the namespaces."""
        usher = [p.pid for name, p in self.processes.items()
                 if name == "usherctrl" or name in self.lnm_names]
        stop_pids(usher)
        for namespace in self.namespaces:
            stop_pids(netns_pids(namespace))
        stop_pids([p.pid for p in self.processes.values()])
        for process in self.processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for namespace in list(self.namespaces):
            run(["ip", "netns", "del", namespace], check=False)
            self.namespaces.remove(namespace)
        self.processes = {}
        self._record()


def guest_segment(cluster, bridge, addresses):
    """One Ethernet segment for the guests across both hosts: a bridge
    ``bridge`` in each host's namespace, joined by a veth pair (a live-migrated
    guest keeps its address and stays reachable); ``addresses[i]`` (CIDR, or
    None) on host i's bridge. Removed with the namespaces."""
    for host, address in zip(cluster.hosts, addresses):
        run(["ip", "-n", host.namespace, "link", "add", bridge, "type", "bridge"])
        if address:
            extra = ["nodad"] if ":" in address else []
            run(["ip", "-n", host.namespace, "addr", "add", address, "dev", bridge, *extra])
        run(["ip", "-n", host.namespace, "link", "set", bridge, "up"])
    first, second = cluster.hosts[0], cluster.hosts[1]
    run(["ip", "-n", first.namespace, "link", "add", f"{bridge}-a", "type", "veth",
         "peer", "name", f"{bridge}-b", "netns", second.namespace])
    for host, end in ((first, f"{bridge}-a"), (second, f"{bridge}-b")):
        run(["ip", "-n", host.namespace, "link", "set", end, "master", bridge, "up"])


def stop_recorded(directory):
    """Stop what a Cluster left in ``directory`` (its cluster.json)."""
    path = os.path.join(directory, "cluster.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return
    pids = [pid for pid, started in state.get("pids", {}).values()
            if started is not None and _start_time(pid) == started]
    for namespace in state.get("namespaces", []):
        pids.extend(netns_pids(namespace))
    stop_pids(pids)
    for namespace in state.get("namespaces", []):
        run(["ip", "netns", "del", namespace], check=False)
    _write(path, json.dumps({"namespaces": [], "pids": {}}))


# --- reading a guest's console ------------------------------------------------------

def console_lines(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    # After a migration two QEMUs may have written the file; keep what is text.
    return [line.strip() for line in data.replace(b"\0", b"").decode(errors="replace")
            .splitlines()]


def console_summary(path):
    """-> (boots, last tick or None): how often the guest booted and the
    last counter value it printed."""
    boots, last = 0, None
    for line in console_lines(path):
        if line.endswith(BOOT_MARKER):
            boots += 1
            last = None
        elif TICK_PREFIX in line:
            tail = line.split(TICK_PREFIX, 1)[1]
            if tail.isdigit():
                last = int(tail)
    return boots, last


# --- command line ---------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.realhv.hosts",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="install the packages and build the guest")
    up = sub.add_parser("up", help="start the hosts and Usher; stop with Ctrl-C")
    up.add_argument("dir")
    down = sub.add_parser("down", help="stop what `up` left running in DIR")
    down.add_argument("dir")
    options = parser.parse_args(argv)
    if options.command == "down":
        stop_recorded(options.dir)
        return 0
    try:
        guest = prepare()
    except CannotRun as e:
        print(f"cannot run here: {e}", file=sys.stderr)
        return 1
    if options.command == "prepare":
        print(json.dumps(guest, indent=1))
        return 0
    stop_recorded(options.dir)
    cluster = Cluster(options.dir, guest, scan_interval=10)
    try:
        cluster.start()
        print(f"ready. ush: ip netns exec {cluster.ctl_namespace} {sys.executable} -m "
              f"usher.clients.ush --config {cluster.ush_config}")
        for host in cluster.hosts:
            print(f"virsh on {host.name}: virsh -c '{host.uri}'")
        print("Ctrl-C stops everything.")
        # Blocked, so that sigwait (not Python's handlers) receives them.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Private libvirt daemons for failure tests: one hypervisor host per LNM
that lives outside the LNM's process.

With the embedded test driver a host dies with its LNM and nothing else can
see its domains. A private ``libvirtd`` serving libvirt's test driver
(``test+unix:///default?socket=...``) behaves like a real host instead: its
VMs outlive a ``kill -9`` of the LNM, a test can destroy or start VMs behind
Usher's back through its own connection, and killing and restarting the
daemon is a real "libvirtd restarted". (The restarted test driver starts
empty: its VMs are gone, as after a host reboot.)

The daemon's ``test:///default`` host is shared by every connection to it,
but only while one is open: the last one to close takes the host with it.
So the daemon is given a *keeper* connection for its lifetime, and the host
outlives any LNM (as a real host does).

The daemon loads no hypervisor modules (``LIBVIRT_DRIVER_DIR`` points at an
empty directory: the test driver is built in), listens only on a unix socket
in its own directory, and needs root (it is run as such here) or a libvirtd
that allows unprivileged daemons.
"""

import os
import shutil
import signal
import subprocess
import time

import libvirt

LIBVIRTD = shutil.which("libvirtd") or "/usr/sbin/libvirtd"


def available():
    return os.path.exists(LIBVIRTD) and os.geteuid() == 0


class PrivateLibvirtd:
    def __init__(self, directory):
        self.dir = os.path.abspath(str(directory))
        os.makedirs(self.dir, exist_ok=True)
        self.drivers = os.path.join(self.dir, "no-drivers")
        os.makedirs(self.drivers, exist_ok=True)
        self.config = os.path.join(self.dir, "libvirtd.conf")
        self.socket = os.path.join(self.dir, "libvirt-sock")
        self.pid_file = os.path.join(self.dir, "libvirtd.pid")
        with open(self.config, "w") as f:
            f.write(f'unix_sock_dir = "{self.dir}"\n'
                    'auth_unix_rw = "none"\nauth_unix_ro = "none"\n')
        self.process = None
        self._keeper = None

    @property
    def uri(self):
        return f"test+unix:///default?socket={self.socket}"

    def start(self, timeout=10.0, clean=True):
        """Start the daemon and wait for its socket. ``clean`` removes the
        test driver's predefined domain, so the host starts empty."""
        for stale in (self.socket, self.pid_file):
            if os.path.exists(stale):
                os.unlink(stale)
        env = dict(os.environ, LIBVIRT_DRIVER_DIR=self.drivers)
        log = open(os.path.join(self.dir, "libvirtd.log"), "ab")
        self.process = subprocess.Popen(
            [LIBVIRTD, "--config", self.config, "--pid-file", self.pid_file],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            # The socket file appears a moment before the daemon accepts.
            if os.path.exists(self.socket):
                try:
                    self._keeper = libvirt.open(self.uri)
                    break
                except libvirt.libvirtError:
                    pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"libvirtd did not start; see {self.dir}/libvirtd.log")
            time.sleep(0.02)
        if clean:
            for dom in self._keeper.listAllDomains():
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        return self

    def connection(self):
        """A libvirt connection of the test's own (a context manager)."""
        return _Connection(self.uri)

    def domains(self):
        """{name: state code} of every domain on this host."""
        with self.connection() as conn:
            return {dom.name(): dom.state()[0] for dom in conn.listAllDomains()}

    def _drop_keeper(self):
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            try:
                keeper.close()
            except libvirt.libvirtError:
                pass

    def kill(self):
        """kill -9 the daemon (and wait for it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._drop_keeper()

    def stop(self):
        self._drop_keeper()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None


class _Connection:
    def __init__(self, uri):
        self.uri = uri
        self.conn = None

    def __enter__(self):
        self.conn = libvirt.open(self.uri)
        return self.conn

    def __exit__(self, *exc):
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass


def domain_xml(name, memory_mib=8, uuid=None):
    """A minimal test-driver domain (for VMs made behind Usher's back)."""
    uuid_element = f"<uuid>{uuid}</uuid>" if uuid else ""
    return (f"<domain type='test'><name>{name}</name>{uuid_element}"
            f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
            "<os><type>hvm</type></os></domain>")

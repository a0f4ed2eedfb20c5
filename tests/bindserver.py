"""A private BIND 9 ``named`` for the tests: started by the tests themselves.

``named`` (Debian package ``bind9``; ``tsig-keygen`` comes with it) runs from
a ``named.conf`` written under a fresh temporary directory, authoritative
only (``recursion no``), listening on a free port of the given addresses
(127.0.0.1 by default; never port 53, never the system's instance). It
serves one forward zone and the given reverse zones as masters, each open
to dynamic updates and zone transfers signed with one TSIG key
(``key_file``, as ``tsig-keygen`` writes it: what the DNS plugin's
``tsig_key_file`` reads). The zone files start with SOA and NS only.

``argv_prefix`` runs ``named`` (and only it) under another command, e.g.
``["ip", "netns", "exec", NS]`` to serve inside a network namespace on the
addresses given by ``listen``; the class assumes nothing else about where
it runs. named binds only addresses configured on an interface (127.0.0.2
is not, though lo routes it). ``query`` then needs a route to those addresses (the caller's
namespace, or a ``query`` of its own).

Nothing is skipped: a missing program raises ``BindUnavailable`` naming
the Debian package. ``stop()`` and ``start()`` may be called again mid-test
(the "DNS server down" tests); the zones, with what updates put in them,
survive a stop (``named`` writes its journal; a stop by SIGTERM flushes it).
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename

KEY_NAME = "usher-test-key"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
DEBIAN_PACKAGE = {"named": "bind9", "tsig-keygen": "bind9"}


class BindUnavailable(RuntimeError):
    """The test server could not be found or started (says why)."""


def find_program(name):
    found = shutil.which(name) or next(
        (os.path.join(d, name) for d in ("/usr/sbin", "/usr/bin", "/sbin")
         if os.access(os.path.join(d, name), os.X_OK)), None)
    if found is None:
        raise BindUnavailable(
            f"{name} is not installed: `make setup` installs the Debian package "
            f"{DEBIAN_PACKAGE[name]} (apt-get install bind9 bind9-utils)")
    return found


def free_port(address="127.0.0.1"):
    """A port free for both TCP and UDP on ``address`` (named serves both)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((address, 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as udp:
                    udp.bind((address, port))
            except OSError:
                continue
            return port
    raise BindUnavailable(f"no free port on {address}")


def _zone_file():
    # The NS is outside every zone served (no glue needed).
    return textwrap.dedent("""\
        $TTL 300
        @ IN SOA ns.invalid. hostmaster.invalid. ( 1 3600 600 86400 300 )
        @ IN NS ns.invalid.
        """)


class BindServer:
    """One private ``named``. ``zone``: the forward zone; ``reverse_zones``:
    e.g. ``["0.201.10.in-addr.arpa"]``; ``listen``: the addresses it serves
    on (one port for all); ``port``: None for a free one (kept across
    restarts)."""

    def __init__(self, base_dir=None, *, zone="usher.test", reverse_zones=(),
                 listen=("127.0.0.1",), port=None, argv_prefix=(), key_name=KEY_NAME):
        self.named = find_program("named")
        self.keygen = find_program("tsig-keygen")
        self.zone = zone.rstrip(".").lower()
        self.reverse_zones = [z.rstrip(".").lower() for z in reverse_zones]
        self.listen = list(listen)
        self.port = port
        self.argv_prefix = list(argv_prefix)
        self.key_name = key_name
        self.dir = tempfile.mkdtemp(prefix="usher-bind-", dir=base_dir)
        self.key_file = os.path.join(self.dir, "tsig.key")
        self.conf_file = os.path.join(self.dir, "named.conf")
        self.pid_file = os.path.join(self.dir, "named.pid")
        self.log_file = os.path.join(self.dir, "named.log")
        self.pid = None
        self._process = None
        self._prepared = False

    @property
    def zones(self):
        return [self.zone, *self.reverse_zones]

    @property
    def address(self):
        """The first address it listens on (where ``query`` asks)."""
        return self.listen[0]

    # -- files -----------------------------------------------------------------------

    def _prepare(self):
        done = subprocess.run([self.keygen, "-a", "hmac-sha256", self.key_name],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise BindUnavailable(f"tsig-keygen failed (exit {done.returncode}): "
                                  f"{done.stderr.strip()}")
        with open(self.key_file, "w", encoding="utf-8") as f:
            f.write(done.stdout)
        os.chmod(self.key_file, 0o600)
        for zone in self.zones:
            with open(self._zone_path(zone), "w", encoding="utf-8") as f:
                f.write(_zone_file())
        self._prepared = True

    def _zone_path(self, zone):
        return os.path.join(self.dir, f"db.{zone}")

    def _write_conf(self):
        v4 = [a for a in self.listen if ":" not in a]
        v6 = [a for a in self.listen if ":" in a]
        listen_v4 = "".join(f"{a}; " for a in v4) or "none; "
        listen_v6 = "".join(f"{a}; " for a in v6) or "none; "
        zones = "".join(textwrap.dedent(f"""\
            zone "{zone}" {{
                type primary;
                file "{self._zone_path(zone)}";
                allow-update {{ key "{self.key_name}"; }};
                allow-transfer {{ key "{self.key_name}"; }};
            }};
            """) for zone in self.zones)
        with open(self.conf_file, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(f"""\
                include "{self.key_file}";
                options {{
                    directory "{self.dir}";
                    pid-file "{self.pid_file}";
                    listen-on port {self.port} {{ {listen_v4}}};
                    listen-on-v6 port {self.port} {{ {listen_v6}}};
                    recursion no;
                    dnssec-validation no;
                    notify no;
                    allow-query {{ any; }};
                }};
                controls {{ }};
                logging {{
                    channel to_file {{ file "{self.log_file}"; severity info; print-time yes; }};
                    category default {{ to_file; }};
                    category update {{ to_file; }};
                    category xfer-out {{ to_file; }};
                }};
                """) + zones)

    def log_tail(self, size=3000):
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as f:
                return f.read()[-size:]
        except OSError:
            return "(no server log)"

    # -- life cycle ------------------------------------------------------------------

    def start(self, attempts=3):
        """Start ``named`` (preparing the key and zones the first time);
        returns once it answers the forward zone's SOA. Keeps its port
        across restarts (the plugin's configuration stays valid)."""
        if self.pid is not None:
            return self
        if not self._prepared:
            self._prepare()
        last = None
        for _ in range(attempts):
            if self.port is None:
                self.port = free_port(self.address)
            self._write_conf()
            try:
                self._launch()
                return self
            except BindUnavailable as e:
                last = e
                if "address in use" in str(e).lower():
                    self.port = None
                    continue
                raise
        raise last

    def _launch(self):
        argv = [*self.argv_prefix, self.named, "-c", self.conf_file, "-u", "root", "-f"]
        if os.geteuid() != 0:
            argv.remove("-u")
            argv.remove("root")
        stderr = open(os.path.join(self.dir, "named.stderr"), "ab")
        try:
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr,
                                             stderr=stderr, cwd=self.dir,
                                             start_new_session=True)
        except OSError as e:
            raise BindUnavailable(f"{' '.join(argv)}: {e}") from e
        finally:
            stderr.close()
        self.pid = self._process.pid
        logged = os.path.getsize(self.log_file) if os.path.exists(self.log_file) else 0
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.pid = None
                raise BindUnavailable(
                    f"named exited with {self._process.returncode}: {' '.join(argv)}\n"
                    f"{self._stderr_tail()}\n--- server log ---\n{self.log_tail()}")
            if self.argv_prefix:
                # Elsewhere (another namespace): no route from here to ask it;
                # named logs "running" once it serves its zones.
                if self._logged_running(logged):
                    return
            else:
                try:
                    if self.query(self.zone, "SOA", timeout=0.5).rcode() == dns.rcode.NOERROR:
                        return
                except (OSError, dns.exception.DNSException):
                    pass
            time.sleep(0.05)
        self.stop()
        raise BindUnavailable(f"named did not answer within {START_TIMEOUT} s\n"
                              f"{self._stderr_tail()}\n--- server log ---\n{self.log_tail()}")

    def _logged_running(self, offset):
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                return any(line.rstrip().endswith(" running") for line in f)
        except OSError:
            return False

    def _stderr_tail(self, size=3000):
        try:
            with open(os.path.join(self.dir, "named.stderr"), encoding="utf-8",
                      errors="replace") as f:
                return f.read()[-size:]
        except OSError:
            return ""

    def stop(self):
        """Stop ``named`` by its PID (SIGTERM, then SIGKILL); the zones'
        journals are flushed by the clean stop."""
        if self.pid is None:
            return
        process, self._process, self.pid = self._process, None, None
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
        except ProcessLookupError:
            pass

    @property
    def running(self):
        return self.pid is not None

    def destroy(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- asking it -------------------------------------------------------------------

    def query(self, name, rdtype, timeout=3.0):
        """Ask the server (UDP, falling back to TCP) -> dns.message.Message."""
        message = dns.message.make_query(name, rdtype)
        return dns.query.udp_with_fallback(message, self.address, timeout=timeout,
                                           port=self.port)[0]

    def values(self, name, rdtype):
        """The sorted values of ``name``'s ``rdtype`` records (texts; names
        without the final dot); [] for none. ``rdtype`` "PTR" with an
        address as ``name`` asks its reverse name."""
        if rdtype.upper() == "PTR" and not name.endswith(".arpa"):
            name = dns.reversename.from_address(name).to_text()
        answer = self.query(name, rdtype)
        wanted = dns.rdatatype.from_text(rdtype)
        found = []
        for rrset in answer.answer:
            if rrset.rdtype == wanted:
                found.extend(r.to_text().rstrip(".") for r in rrset)
        return sorted(found)

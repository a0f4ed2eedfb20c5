"""The user's story of the paper's Figure 3, end to end on real QEMU guests
(issue 13): "After completing their boot sequence, user mcnett can ssh into
any of his new VMs by name."

Beside the controller, in its network namespace, run the site's services as
the UCSD deployment has them: PostgreSQL (the SQL plugin: log, mirror and IP
address management), OpenLDAP's slapd (the LDAP plugin: the user's login and
each cluster's branch) and BIND (the DNS plugin: forward, reverse and
round-robin names); the filesystem plugin prepares the trees under an export
root. The guests' bridge spans both hosts (``hosts.guest_segment``), so a
live-migrated guest keeps its address.

The story, each step timed (``<tmp_path>/timings.json``; printed with -s):
alice, known to the directory only as far as Usher's login goes, runs
``start -n sneetch -c 2``; each guest boots with the address IP management
gave it and the name Usher gave it; from a host, the test resolves
``1.sneetch.alice.usher.test`` through BIND and reaches the guest's service
by that name (the guest answers with its address, MAC and host name); the
cluster's LDAP branch holds alice in its admin group; its filesystem trees
exist, owned by alice's uid from the directory; one guest live-migrates and
its name still reaches it; deleting the cluster removes the records, the
address reservations, the branch and the trees.

Skips only as test_realhv.py does.
"""

import json
import os
import subprocess
import sys
import textwrap

import ldap3
import pytest

from tests.bindserver import BindServer
from tests.pgserver import PostgresServer
from tests.realhv import hosts
from tests.realhv.test_realhv import BOOT_TIMEOUT, running, ush, wait_for, wait_ticking
# The fixtures: timed steps, the guest (skips where the machine cannot run it).
from tests.realhv.test_realhv import guest, steps  # noqa: F401
from tests.slapd import SlapdServer

USER = hosts.USHER_USER
DOMAIN = hosts.USHER_DOMAIN
CLUSTER = "sneetch"
VMS = [f"{i}.{CLUSTER}.{USER}.{DOMAIN}" for i in (1, 2)]
CLUSTER_NAME = f"{CLUSTER}.{USER}.{DOMAIN}"
BRIDGE = "ushbr0"
SUBNET = "10.201.0"
REVERSE_ZONE = "0.201.10.in-addr.arpa"
NETWORK_ARGS = "mac, ip_address, ip_prefix, ip_gateway, ip_dns, vlan, bridge"
EVENTS = {
    "sql": "start_request, register_vm, start_complete, vm_state_changed, vm_removed, "
           "op_complete, migrate_complete, vm_lost, vm_missing, vm_adopted",
    "ldap": "register_vm, vm_removed, vm_adopted",
    "dns": "register_vm, vm_removed, vm_adopted",
    "filesystem": "start_request, register_vm, vm_removed, vm_adopted",
}


def in_namespace(namespace, code, *args, timeout=30):
    """Run Python ``code`` inside ``namespace`` -> what it printed as JSON."""
    done = hosts.run(["ip", "netns", "exec", namespace, sys.executable, "-c",
                      textwrap.dedent(code), *map(str, args)], timeout=timeout, cwd=hosts.REPO)
    return json.loads(done.stdout)


# From a host: the name's address through BIND, then the guest's page at it.
RESOLVE_AND_FETCH = """
    import json, sys, urllib.request
    import dns.message, dns.query, dns.rcode
    server, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    answer = dns.query.udp(dns.message.make_query(name, "A"), server, port=port, timeout=3)
    addresses = sorted(r.address for rrset in answer.answer for r in rrset)
    page = None
    if addresses:
        try:
            page = urllib.request.urlopen(f"http://{addresses[0]}/", timeout=3).read().decode()
        except OSError:
            pass
    print(json.dumps({"rcode": dns.rcode.to_text(answer.rcode()), "addresses": addresses,
                      "page": page}))
"""
PTR = """
    import json, sys
    import dns.message, dns.query, dns.reversename
    server, port, address = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    query = dns.message.make_query(dns.reversename.from_address(address), "PTR")
    answer = dns.query.udp(query, server, port=port, timeout=3)
    print(json.dumps(sorted(r.target.to_text() for rrset in answer.answer for r in rrset)))
"""


class Site:
    """The site's services in the controller's namespace, and the plugin
    configuration that points at them."""

    def __init__(self, directory):
        self.dir = directory
        self.export_root = os.path.join(directory, "export")
        os.makedirs(self.export_root)
        self.bind = self.slapd = self.postgres = None
        self.database = None

    def start(self, cluster):
        prefix = ["ip", "netns", "exec", cluster.ctl_namespace]
        self.bind = BindServer(self.dir, zone=DOMAIN, reverse_zones=[REVERSE_ZONE],
                               listen=["127.0.0.1", hosts.CONTROLLER_ADDRESS],
                               argv_prefix=prefix)
        self.bind.start()
        # (Its own short temporary directory: the ldapi socket's path must
        # stay under 108 bytes.)
        self.slapd = SlapdServer(argv_prefix=prefix)
        self.slapd.start()
        self.postgres = PostgresServer(argv_prefix=prefix)
        self.postgres.start()
        self.database = self.postgres.create_database("usher")
        self.write_configs(cluster)
        # alice in the directory, through the administrator's own command.
        done = subprocess.run(["ip", "netns", "exec", cluster.ctl_namespace, sys.executable,
                               "-m", "usher.admin", "user", "add", USER, "--ldap-config",
                               self.ldap_config, "--password-stdin"],
                              input=cluster.password + "\n", capture_output=True, text=True,
                              timeout=60, cwd=hosts.REPO)
        assert done.returncode == 0, done.stdout + done.stderr
        connection = self.slapd.connect()
        connection.search(f"uid={USER},ou=people,{self.slapd.base_dn}", "(objectClass=*)",
                          attributes=["uidNumber"])
        self.uid = int(connection.entries[0].uidNumber.value)

    def stop(self):
        for server in (self.bind, self.slapd):
            if server is not None:
                server.destroy()
        if self.postgres is not None:
            self.postgres.destroy()

    def write_configs(self, cluster):
        self.ldap_config = self.slapd.plugin_config(os.path.join(self.dir, "ldap.config"),
                                                    cluster_branch_policy="delete")
        self.configs = {"ldap": self.ldap_config}
        self.configs["sql"] = self._write("sql.config", f"""\
            database = {self.database}
            [subnets]
            [[guests]]
            cidr = {SUBNET}.0/24
            gateway = {SUBNET}.254
            dns = {SUBNET}.254
            bridge = {BRIDGE}
            [ranges]
            [[alice]]
            subnet = guests
            first = {SUBNET}.40
            last = {SUBNET}.49
            owner = {USER}
            """)
        self.configs["dns"] = self._write("dns.config", f"""\
            server = 127.0.0.1
            port = {self.bind.port}
            zone = {DOMAIN}
            reverse_zones = {REVERSE_ZONE}
            tsig_key_file = {self.bind.key_file}
            """)
        self.configs["filesystem"] = self._write("filesystem.config", f"""\
            export_root = {self.export_root}
            uid_source = ldap
            ldap_config = {self.ldap_config}
            local_cleanup = delete
            cluster_cleanup = delete
            """)

    def _write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path

    def ctrl_options(self):
        plugins = "".join(
            f"[[[{name}]]]\nevents = {events}\nconfig = {self.configs[name]}\n"
            for name, events in EVENTS.items())
        return (f"auth_modules = ldap, local\nldap_config = {self.ldap_config}\n"
                "[[plugins]]\n[[[open_authz]]]\n"
                "events = start_request, list_request, destroy_request, migrate_request, "
                "delete_request\n"
                f"[[[roundrobin]]]\nevents = start_request, migrate_request\n{plugins}")


@pytest.fixture
def story(guest, steps, tmp_path):  # noqa: F811
    directory = tmp_path / "realhv"
    directory.mkdir()
    site = Site(str(tmp_path / "site"))
    os.makedirs(site.dir, exist_ok=True)

    # The plugins' configuration is known once the services have their ports
    # (ctrl_options is called after before_usher).
    cluster = hosts.Cluster(directory, guest, before_usher=site.start,
                            ctrl_options=site.ctrl_options,
                            lnm_options=f"plugin_args = {NETWORK_ARGS}\nbridges = {BRIDGE}\n")
    try:
        with running(cluster, steps):
            yield cluster, site
    finally:
        site.stop()


def resolve_and_fetch(cluster, site, name, host=0):
    return in_namespace(cluster.hosts[host].namespace, RESOLVE_AND_FETCH,
                        hosts.CONTROLLER_ADDRESS, site.bind.port, name)


def reaches(cluster, site, vm, address, mac):
    """Does ``vm``'s name lead, through BIND, to the guest itself?"""
    seen = resolve_and_fetch(cluster, site, vm)
    return (seen["addresses"] == [address] and seen["page"] is not None
            and seen["page"].split() == ["usher-guest", address, mac, vm])


def branch_admins(site):
    """The members of the cluster's admin group in its branch, or None (no branch)."""
    connection = site.slapd.connect()
    dn = f"cn=admin,ou=groups,ou={CLUSTER},ou={USER},ou=clusters,{site.slapd.base_dn}"
    if not connection.search(dn, "(objectClass=*)", search_scope=ldap3.BASE,
                             attributes=["memberUid"]):
        return None
    return list(connection.entries[0].memberUid.values)


def leases(site):
    rows = site.postgres.psql("usher", "SELECT vm, address, state FROM addresses "
                              "WHERE vm IS NOT NULL ORDER BY vm")
    return [line.split("|") for line in rows.splitlines() if line]


def trees(site):
    root = site.export_root
    return {"global": os.path.isdir(os.path.join(root, "global", USER)),
            "cluster": os.path.isdir(os.path.join(root, "cluster", USER, CLUSTER)),
            "local": sorted(os.listdir(os.path.join(root, "local", USER)))
            if os.path.isdir(os.path.join(root, "local", USER)) else []}


def test_alice_reaches_her_new_vms_by_name(story, steps):
    cluster, site = story
    hosts.guest_segment(cluster, BRIDGE, [f"{SUBNET}.254/24", f"{SUBNET}.253/24"])

    with steps("ush start -n sneetch -c 2 (login through LDAP)"):
        started = ush(cluster, "start", "-n", CLUSTER, "-c", "2")
    assert sorted(vm["name"] for vm in started) == VMS
    assert "authenticated by module ldap" in cluster.log_tail("usherctrl", 400)
    records = {r["name"]: r for r in ush(cluster, "list", "-n", CLUSTER)}
    assert {r["lnm"] for r in records.values()} == {"lnm1", "lnm2"}
    address = {vm: records[vm]["args"]["ip_address"] for vm in VMS}
    mac = {vm: records[vm]["args"]["mac"] for vm in VMS}
    assert all(a.startswith(f"{SUBNET}.4") for a in address.values())

    with steps("both guests boot with the addresses IP management gave them"):
        for vm in VMS:
            lnm = records[vm]["lnm"]
            wait_ticking(os.path.join(cluster.dir, f"{lnm}-state", "consoles", f"{vm}.log"),
                         boots=1, timeout=BOOT_TIMEOUT)
    assert {tuple(row[:2]) for row in leases(site)} == {(vm, address[vm]) for vm in VMS}

    with steps("each name resolves through BIND and reaches its guest"):
        for vm in VMS:
            wait_for(lambda vm=vm: reaches(cluster, site, vm, address[vm], mac[vm]), 60,
                     f"{vm} to answer by name")
    for vm in VMS:
        ptr = in_namespace(cluster.hosts[0].namespace, PTR, hosts.CONTROLLER_ADDRESS,
                           site.bind.port, address[vm])
        assert ptr == [vm + "."]
    assert resolve_and_fetch(cluster, site, CLUSTER_NAME)["addresses"] == sorted(
        address.values())

    with steps("the cluster's LDAP branch holds alice in its admin group"):
        wait_for(lambda: branch_admins(site) == [USER], 30, "the cluster's branch")

    with steps("the filesystem trees exist, owned by alice's uid"):
        assert trees(site) == {"global": True, "cluster": True,
                               "local": sorted(vm.split(f".{USER}.")[0] for vm in VMS)}
        for path in ("global/alice", "cluster/alice/sneetch", "local/alice/1.sneetch",
                     "local/alice/1.sneetch/etc/rc3.d"):
            assert os.stat(os.path.join(site.export_root, path)).st_uid == site.uid

    moving = VMS[0]
    target = "lnm2" if records[moving]["lnm"] == "lnm1" else "lnm1"
    with steps(f"live-migrate {moving} to {target}; its name still reaches it"):
        result = ush(cluster, "migrate", moving, "--to", target)
        assert result["migrated"] == [{"name": moving, "from": records[moving]["lnm"],
                                       "to": target}], result
        wait_for(lambda: reaches(cluster, site, moving, address[moving], mac[moving]), 30,
                 f"{moving} to answer by name after the migration")
    # Nothing changed in DNS: the same one address.
    assert resolve_and_fetch(cluster, site, moving, host=1)["addresses"] == [address[moving]]

    with steps("delete the cluster: records, reservations, branch and trees gone"):
        ush(cluster, "delete", "--force", "-n", CLUSTER)
        wait_for(lambda: all(resolve_and_fetch(cluster, site, vm)["rcode"] == "NXDOMAIN"
                             for vm in VMS + [CLUSTER_NAME]), 30, "the names to go")
        wait_for(lambda: leases(site) == [], 30, "the reservations to go")
        wait_for(lambda: branch_admins(site) is None, 30, "the branch to go")
        wait_for(lambda: trees(site) == {"global": True, "cluster": False, "local": []}, 30,
                 "the trees to go")

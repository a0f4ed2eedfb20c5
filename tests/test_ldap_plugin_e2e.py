"""The LDAP plugin through the real controller (tests/grid.py: real
NodeManagers on libvirt test hosts), registered on register_vm, vm_removed
and vm_adopted, against the private slapd with the shipped access rules
(tests/slapd.py). Checked with ldap3 as the directory's root: a cluster's
branch with its owner (an alias of the global entry) in its admin group;
kept while a VM is left; at the last VM removed (``delete``) or kept
(``keep``); slapd stopped during a start (the start succeeds, the branch
follows); reconciliation after a controller restart."""

import ldap3
import pytest
import pytest_twisted
from twisted.internet import reactor, task

from usher.config import load_plugin_config
from usher.controller.core import Controller
from usher.controller.plugin_api import thread_pool_runner
from usher.controller.plugins import PluginRegistry
from usher.controller.recovery import Recovery
from usher.plugins.ldap.directory import load_directory
from usher.settings import default_plugin_registrations
from usher.vmset import Selection

from tests.clientgrid import plugin_instance
from tests.e2e import wait_for
from tests.grid import DOMAIN, Grid

LDAP_EVENTS = ["register_vm", "vm_removed", "vm_adopted"]
BASE = "dc=usher,dc=local"


def full(short, owner):
    return f"{short}.{owner}.{DOMAIN}"


def branch_dn(owner, cluster):
    return f"ou={cluster},ou={owner},ou=clusters,{BASE}"


def read(slapd, dn, attributes=("*",)):
    """-> the entry at ``dn`` (as the root DN, aliases not followed) or None."""
    conn = slapd.connect()
    try:
        conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE,
                    attributes=list(attributes), dereference_aliases=ldap3.DEREF_NEVER)
        return conn.entries[0] if conn.entries else None
    finally:
        conn.unbind()


def branch_state(slapd, owner, cluster):
    """-> None (no branch) or (alias target, admin memberUids)."""
    if read(slapd, branch_dn(owner, cluster)) is None:
        return None
    alias = read(slapd, f"uid={owner},ou=people,{branch_dn(owner, cluster)}")
    admin = read(slapd, f"cn=admin,ou=groups,{branch_dn(owner, cluster)}")
    return (alias.aliasedObjectName.value if alias is not None else None,
            sorted(admin.memberUid.values) if admin is not None else None)


def registrations(config):
    found = default_plugin_registrations()
    found["ldap"] = {"plugin": "ldap", "events": LDAP_EVENTS, "config": config, "order": None}
    return found


class LdapGrid:
    def __init__(self, tmp_path, slapd, pool, owner, policy="delete", lnms=2):
        self.slapd = slapd
        self.owner = owner
        self.config = slapd.plugin_config(tmp_path / "ldap.config",
                                          cluster_branch_policy=policy,
                                          reconcile_interval=3600)
        self.pool = pool
        self.grid = Grid(reactor, tmp_path, registrations=registrations(self.config), lnms=lnms)
        # The plugin thread pool usher.controller.service gives a real controller.
        self.grid.controller.api.run_in_thread = thread_pool_runner(reactor, pool)
        self.directory = load_directory(self.config)

    async def start(self):
        if read(self.slapd, f"uid={self.owner},ou=people,{BASE}") is None:
            self.slapd.add_user(self.owner, f"{self.owner}-secret")
        await self.grid.start()
        self.plugin = plugin_instance(self.grid, "ldap")
        await self.plugin.reconciled
        return self

    async def stop(self):
        self.grid.controller.plugins.unregister_all()
        await self.grid.stop()

    async def start_vms(self, cluster, count):
        result = await self.grid.controller.start(self.owner, False, [], [],
                                                  {"cluster": cluster, "count": count})
        assert not result["failed"], result
        return sorted(s["name"] for s in result["started"])

    async def delete(self, names):
        await self.grid.controller.op_on(self.owner, False, "delete", Selection(names=names),
                                         {"force": True})
        await self.plugin.keeper.idle()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("policy", ["delete", "keep"])
async def test_a_clusters_branch_lives_with_its_vms(tmp_path, slapd, pool, policy):
    owner = f"branch-{policy}"
    (tmp_path / "g").mkdir()
    lg = await LdapGrid(tmp_path / "g", slapd, pool, owner, policy=policy).start()
    try:
        names = await lg.start_vms("sneetch", 2)
        assert names == [full("1.sneetch", owner), full("2.sneetch", owner)]
        # register_vm was awaited before the starts: the branch is there.
        assert branch_state(slapd, owner, "sneetch") == (f"uid={owner},ou=people,{BASE}",
                                                         [owner])
        assert lg.directory.cluster_admins(owner, "sneetch") == [owner]
        # An account the user added inside (as the in-VM tool would).
        conn = slapd.connect()
        conn.add(f"uid=guest,ou=people,{branch_dn(owner, 'sneetch')}",
                 ["inetOrgPerson", "posixAccount"],
                 {"uid": "guest", "cn": "guest", "sn": "guest", "uidNumber": 20001,
                  "gidNumber": 100, "homeDirectory": "/home/guest"})
        conn.unbind()

        await lg.delete([names[0]])
        assert branch_state(slapd, owner, "sneetch") is not None          # 2.sneetch left
        await lg.delete([names[1]])
        if policy == "delete":
            assert branch_state(slapd, owner, "sneetch") is None
            assert read(slapd, f"uid=guest,ou=people,{branch_dn(owner, 'sneetch')}") is None
            # The owner's global entry is untouched.
            assert read(slapd, f"uid={owner},ou=people,{BASE}") is not None
        else:
            assert branch_state(slapd, owner, "sneetch") == (f"uid={owner},ou=people,{BASE}",
                                                             [owner])
            assert read(slapd, f"uid=guest,ou=people,{branch_dn(owner, 'sneetch')}")
            lg.directory.remove_cluster_branch(owner, "sneetch")
    finally:
        await lg.stop()


@pytest_twisted.ensureDeferred
async def test_clusters_of_the_same_name_and_other_clusters_are_apart(tmp_path, slapd, pool):
    (tmp_path / "g").mkdir()
    lg = await LdapGrid(tmp_path / "g", slapd, pool, "apart-a").start()
    try:
        web = await lg.start_vms("web", 1)
        db = await lg.start_vms("db", 1)
        await lg.delete(web)
        assert branch_state(slapd, "apart-a", "web") is None
        assert branch_state(slapd, "apart-a", "db") == (f"uid=apart-a,ou=people,{BASE}",
                                                         ["apart-a"])
        await lg.delete(db)
        # The owner's container goes with their last branch.
        assert read(slapd, f"ou=apart-a,ou=clusters,{BASE}") is None
    finally:
        await lg.stop()


@pytest_twisted.ensureDeferred
async def test_slapd_stopped_during_a_start_the_start_succeeds_and_the_branch_follows(
        tmp_path, slapd, pool):
    owner = "downtime"
    (tmp_path / "g").mkdir()
    lg = await LdapGrid(tmp_path / "g", slapd, pool, owner).start()
    try:
        slapd.stop()
        try:
            names = await lg.start_vms("late", 2)
            assert len(names) == 2
            states = {lg.grid.controller.state.vms[n]["state"] for n in names}
            assert states == {"run"}
            assert lg.plugin.keeper.down
        finally:
            slapd.start()
        # The outage's probe (1 s, then 2 s ...) reconciles once slapd is back.
        await wait_for(lambda: not lg.plugin.keeper.down, timeout=30)
        await lg.plugin.keeper.idle()
        assert branch_state(slapd, owner, "late") == (f"uid={owner},ou=people,{BASE}", [owner])
        await lg.delete(names)
        assert branch_state(slapd, owner, "late") is None
    finally:
        if not slapd.running:
            slapd.start()
        await lg.stop()


@pytest_twisted.ensureDeferred
async def test_a_restarted_controller_reconciles_the_branches(tmp_path, slapd, pool):
    """kill -9 of the controller: the VM comes back with its LNM; meanwhile
    its branch was lost and another cluster's stale branch was left. After
    recovery: the branch is back, the stale one gone."""
    owner = "restarted"
    (tmp_path / "g").mkdir()
    lg = await LdapGrid(tmp_path / "g", slapd, pool, owner, lnms=1).start()
    grid = lg.grid
    fresh = None
    try:
        names = await lg.start_vms("phoenix", 1)
        grid.controller.plugins.unregister_all()         # the old controller is gone
        lg.directory.remove_cluster_branch(owner, "phoenix")
        lg.directory.ensure_cluster_branch(owner, "stale")
        assert branch_state(slapd, owner, "phoenix") is None

        fresh = Controller(domain=DOMAIN, clock=reactor, admins=["root"])
        fresh.plugins = PluginRegistry(fresh.chains, fresh.api, load_config=load_plugin_config)
        fresh.api.run_in_thread = thread_pool_runner(reactor, pool)
        fresh.recovery = Recovery(["lnm1"], clock=task.Clock(), window=30,
                                  on_done=fresh.resolve_soon)
        fresh.watch_lnms(fresh.recovery)
        plugin = None
        for event in LDAP_EVENTS:
            plugin = fresh.plugins.register("ldap", event, lg.config)
        assert not plugin.reconciled.called               # recovering: nothing removed
        assert branch_state(slapd, owner, "stale") is not None
        await grid.attach("lnm1", fresh)
        result = await plugin.reconciled
        assert (owner, "stale") in result.removed
        assert names[0] in fresh.state.vms
        assert branch_state(slapd, owner, "phoenix") == (f"uid={owner},ou=people,{BASE}",
                                                         [owner])
        assert branch_state(slapd, owner, "stale") is None
        lg.plugin = plugin
        fresh.state.remove(names[0])
        await plugin.keeper.idle()
        assert branch_state(slapd, owner, "phoenix") is None
    finally:
        if fresh is not None:
            fresh.plugins.unregister_all()
        await grid.stop()

"""The DNS plugin's pure parts and its plugin logic with task.Clock and
in-memory doubles: the records a VM needs, key files, hostile
configuration (ConfigError naming the file and key), register_vm never
blocking, skipped owners, reconciliation's arithmetic, the admin query."""

import pytest
from twisted.internet import defer, task

from usher.controller.state import GlobalState
from usher.errors import ConfigError, PermissionDenied
from usher.config import load_plugin_config
from usher.plugins.dns import CONFIG_SPEC, Plugin, records
from usher.plugins.dns.keyfile import KeyFileError, parse_key_text

DOMAIN = "usher.test"
SECRET = "0Cli7n0WcXHFh5uck9/UOcdPVm/Y0iIjPOey8nbtd9I="
KEY = f'key "usher-key" {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET}";\n}};\n'
LAYOUT = records.Layout(DOMAIN, DOMAIN, ["0.9.10.in-addr.arpa"])


def vm(short, owner="alice", address="10.9.0.3", cluster=None):
    name = f"{short}.{owner}.{DOMAIN}"
    return {"name": name, "owner": owner, "cluster": cluster or short.split(".", 1)[-1],
            "args": {} if address is None else {"ip_address": address}}


def test_a_vm_needs_its_a_record_its_ptr_and_its_address_at_the_cluster_name():
    identity = records.identify(vm("1.web"), DOMAIN)
    assert set(records.records_for(identity, LAYOUT)) == {
        records.Record(DOMAIN, "1.web.alice.usher.test", "A", "10.9.0.3"),
        records.Record(DOMAIN, "web.alice.usher.test", "A", "10.9.0.3"),
        records.Record("0.9.10.in-addr.arpa", "3.0.9.10.in-addr.arpa", "PTR",
                       "1.web.alice.usher.test")}
    six = records.identify(vm("1.web", address="2001:DB8::0:7"), DOMAIN)
    assert [r.rdtype for r in records.records_for(six, LAYOUT)] == ["AAAA", "AAAA"]
    assert records.records_for(six, LAYOUT)[0].value == "2001:db8::7"
    no_clusters = records.Layout(DOMAIN, DOMAIN, (), cluster_names=False)
    assert len(records.records_for(identity, no_clusters)) == 1


def test_the_ptr_goes_in_the_longest_reverse_zone():
    layout = records.Layout(DOMAIN, "test", ["10.in-addr.arpa", "9.10.in-addr.arpa"])
    ptr = [r for r in records.records_for(records.identify(vm("1.web"), DOMAIN), layout)
           if r.rdtype == "PTR"]
    assert [r.zone for r in ptr] == ["9.10.in-addr.arpa"]


@pytest.mark.parametrize("record, why", [
    (vm("1.web", owner="b_ob"), "'_', which is not valid in a host name"),
    (vm("1.web", address=None), "no ip_address"),
    (vm("1.web", address="10.9.0.300"), "ip_address"),
    (vm("1.web", address="fe80::1%eth0"), "not an IP address"),
    (vm("1.web", address="10.9.0.3\nx"), "ip_address"),
    (dict(vm("1.web"), cluster="Bad_Cluster"), "invalid cluster"),
    (dict(vm("1.web"), owner="mallory"), "owner"),
    (dict(vm("1.web"), name="www.example.org"), "not an Usher VM name"),
    (dict(vm("1.web"), name="1.we$b.alice.usher.test"), "invalid VM name label"),
])
def test_hostile_or_unusable_vms_are_skipped_saying_why(record, why):
    with pytest.raises(records.Skipped, match=None) as skipped:
        records.identify(record, DOMAIN)
    assert why in str(skipped.value)


def test_only_usher_records_are_reconciled():
    found = [("usher.test", "SOA", "..."), ("usher.test", "NS", "ns.invalid."),
             ("www.usher.test", "A", "192.0.2.1"), ("1.web.alice.usher.test", "A", "10.9.0.3"),
             ("web.alice.usher.test", "TXT", '"x"'), ("web.alice.usher.test", "AAAA", "::1"),
             ("1.web.b_ob.usher.test", "A", "10.9.0.4")]
    assert records.usher_records(DOMAIN, found, LAYOUT) == {
        records.Record(DOMAIN, "1.web.alice.usher.test", "A", "10.9.0.3"),
        records.Record(DOMAIN, "web.alice.usher.test", "AAAA", "::1")}
    reverse = [("3.0.9.10.in-addr.arpa", "PTR", "1.web.alice.usher.test"),
               ("4.0.9.10.in-addr.arpa", "PTR", "printer.example.org"),
               ("0.9.10.in-addr.arpa", "NS", "ns.invalid.")]
    assert [r.name for r in records.usher_records("0.9.10.in-addr.arpa", reverse, LAYOUT)] \
        == ["3.0.9.10.in-addr.arpa"]


def test_a_record_two_vms_want_goes_with_the_last_of_them():
    shared = records.Record(DOMAIN, "web.alice.usher.test", "A", "10.9.0.3")
    book = records.Contributions()
    assert book.set("web.alice.usher.test", [shared]) == ([shared], [])
    assert book.set("1.web.alice.usher.test", [shared]) == ([], [])
    assert book.remove("web.alice.usher.test") == ([], [])
    assert book.remove("1.web.alice.usher.test") == ([], [shared])


@pytest.mark.parametrize("zone, ok", [
    ("0.9.10.in-addr.arpa", True), ("1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", True),
    ("ip6.arpa", True), ("example.org", False), ("256.10.in-addr.arpa", False),
    ("01.10.in-addr.arpa", False), ("1.2.3.4.5.in-addr.arpa", False),
    ("10.0.ip6.arpa", False), ("g.ip6.arpa", False), ("bad_label.in-addr.arpa", False)])
def test_reverse_zones_must_be_under_in_addr_or_ip6_arpa(zone, ok):
    if ok:
        assert records.check_reverse_zone(zone) == zone
    else:
        with pytest.raises(ValueError):
            records.check_reverse_zone(zone)


@pytest.mark.parametrize("text, problem", [
    ("", "not one BIND key statement"),
    (KEY + KEY, "not one BIND key statement"),
    (KEY.replace("hmac-sha256", "rot13"), "unknown algorithm"),
    (KEY.replace(SECRET, "not*base64"), "not base64"),
    (KEY.replace(SECRET, "c2hvcnQ="), "shorter than 128 bits"),
    (KEY.replace("\talgorithm hmac-sha256;\n", ""), "has no algorithm"),
    (KEY.replace("};\n", "include \"/etc/shadow\"; };\n", 1), "only 'algorithm'"),
])
def test_a_bad_key_file_is_described_never_quoted(text, problem):
    with pytest.raises(KeyFileError) as bad:
        parse_key_text(text)
    assert problem in str(bad.value)
    assert SECRET not in str(bad.value)


def test_a_key_file_with_comments_reads():
    key = parse_key_text("# made by tsig-keygen\n" + KEY.replace("};", "}; // end"))
    assert key.name.to_text() == "usher-key." and key.algorithm_text == "hmac-sha256"
    assert SECRET not in repr(key)


# -- the plugin with doubles -------------------------------------------------------------

class FakeServer:
    def __init__(self):
        self.zones = {}       # zone -> set of (name, rdtype, value)
        self.down = False
        self.updates = []

    def __str__(self):
        return "fake:53"

    def update(self, zone, changes):
        from usher.plugins.dns.updates import DnsUnavailable
        if self.down:
            raise DnsUnavailable("fake:53: connection refused (is the server running?)")
        self.updates.append((zone, changes))
        for name, rdtype, value, wanted in changes:
            (self.zones.setdefault(zone, set()).add if wanted
             else self.zones.setdefault(zone, set()).discard)((name, rdtype, value))

    def transfer(self, zone):
        return sorted(self.zones.get(zone, ()))


class FakeAPI:
    """Synchronous run_blocking (or a held one), a task.Clock, a real state."""

    def __init__(self):
        self.clock = task.Clock()
        self.state = GlobalState(DOMAIN)
        self.queries = {}
        self.hold = False
        self.held = []
        self.settle = defer.Deferred()

    def run_blocking(self, function, *args):
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, function, args))
            return d
        return defer.maybeDeferred(function, *args)

    def release(self):
        held, self.held = self.held, []
        for d, function, args in held:
            defer.maybeDeferred(function, *args).chainDeferred(d)

    async def settled(self):
        await self.settle

    def register_query(self, name, handler, owner=None):
        self.queries[name] = handler


class Event:
    def __init__(self, name, vm):
        self.name, self.vm = name, vm


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "usher.key"
    path.write_text(KEY)
    return str(path)


def make_plugin(key_file, **options):
    api = FakeAPI()
    server = FakeServer()
    config = load_plugin_config(CONFIG_SPEC, None)
    config.update({"tsig_key_file": key_file, "reverse_zones": ["0.9.10.in-addr.arpa"],
                   **options})
    return Plugin(config, api, source="/etc/usher/plugins/dns.config", server=server), \
        api, server


def test_register_vm_waits_at_most_register_wait_and_the_update_still_lands(key_file):
    plugin, api, server = make_plugin(key_file)
    api.settle.callback(None)
    api.release()
    api.hold = True
    d = defer.ensureDeferred(plugin.entry_point(Event("register_vm", vm("1.web"))))
    assert not d.called
    api.clock.advance(2.0)
    assert d.called and plugin.queue.pending == 3     # the start went on
    api.hold = False
    api.release()
    assert ("1.web.alice.usher.test", "A", "10.9.0.3") in server.zones[DOMAIN]
    assert plugin.queue.pending == 0


def test_an_owner_with_an_underscore_is_skipped_and_logged_once(key_file):
    from tests.test_dns_queue import Captured
    from twisted.logger import LogLevel
    plugin, api, server = make_plugin(key_file)
    with Captured() as log:
        for _ in range(3):
            assert plugin.entry_point(Event("register_vm", vm("1.web", owner="b_ob"))) is None
    warnings = [e for e in log.at(LogLevel.warn) if "no records" in e["log_format"]]
    assert len(warnings) == 1 and "check-names" in warnings[0]["why"]
    assert plugin.queue.pending == 0 and "1.web.b_ob.usher.test" in plugin.skipped


def test_migration_does_nothing(key_file):
    plugin, api, server = make_plugin(key_file)
    assert plugin.entry_point(Event("migrate_complete", vm("1.web"))) is None
    assert plugin.queue.pending == 0


def test_reconciliation_waits_for_the_settled_state_then_fixes_the_zones(key_file):
    plugin, api, server = make_plugin(key_file)
    server.zones = {DOMAIN: {("1.old.alice.usher.test", "A", "10.9.0.9"),
                             ("www.usher.test", "A", "192.0.2.1"),
                             ("1.web.alice.usher.test", "A", "10.9.0.3")},
                    "0.9.10.in-addr.arpa": {("9.0.9.10.in-addr.arpa", "PTR",
                                             "1.old.alice.usher.test")}}
    # Came back without arguments: its address is the one its name has.
    back = api.state.new_record("1.web.alice.usher.test", state="run", lnm="lnm1")
    api.state.add(back)
    assert not plugin.reconciled.called
    api.settle.callback(None)
    assert plugin.reconciled.result == (2, 2)   # back's PTR and cluster name; old's A, PTR
    assert server.zones[DOMAIN] == {("www.usher.test", "A", "192.0.2.1"),
                                    ("1.web.alice.usher.test", "A", "10.9.0.3"),
                                    ("web.alice.usher.test", "A", "10.9.0.3")}
    assert server.zones["0.9.10.in-addr.arpa"] == {
        ("3.0.9.10.in-addr.arpa", "PTR", "1.web.alice.usher.test")}


def test_a_transfer_that_fails_is_retried_with_backoff(key_file):
    plugin, api, server = make_plugin(key_file, retry_initial=1.0, retry_max=4.0)
    server.down = True
    server.transfer = lambda zone: FakeServer.update(server, zone, [])
    api.settle.callback(None)
    api.clock.advance(1.0)
    api.clock.advance(2.0)
    assert not plugin.reconciled.called
    server.down = False
    server.transfer = lambda zone: []
    api.clock.advance(4.0)
    assert plugin.reconciled.result == (0, 0)
    plugin.stop()


def test_dns_status_is_for_administrators(key_file):
    plugin, api, server = make_plugin(key_file)
    query = api.queries["dns.status"]
    refused = defer.ensureDeferred(query("alice", False, {}))
    assert refused.result.check(PermissionDenied)
    refused.addErrback(lambda _failure: None)
    status = defer.ensureDeferred(query("root", True, {})).result
    assert status[0]["server"] == "fake:53" and status[0]["pending"] == 0


@pytest.mark.parametrize("options, key, problem", [
    ({"server": "dns.example.org"}, "server", "not an IP address"),
    ({"zone": "bad_zone"}, "zone", "not a DNS label"),
    ({"zone": "example.org"}, "zone", "does not hold the Usher domain"),
    ({"reverse_zones": ["example.org"]}, "reverse_zones", "not under in-addr.arpa"),
    ({"tsig_key_file": None}, "tsig_key_file", "not set"),
    ({"tsig_key_file": "relative.key"}, "tsig_key_file", "not an absolute path"),
    ({"tsig_key_file": "/nonexistent/usher.key"}, "tsig_key_file", "cannot read it"),
    ({"retry_initial": 10.0, "retry_max": 1.0}, "retry_max", "less than retry_initial"),
    ({"register_wait": 5.0, "timeout": 5.0}, "register_wait", "not less than timeout"),
])
def test_hostile_configuration_is_a_config_error_naming_file_and_key(
        key_file, options, key, problem):
    with pytest.raises(ConfigError) as bad:
        make_plugin(key_file, **options)
    assert str(bad.value).startswith(f"/etc/usher/plugins/dns.config: {key}: ")
    assert problem in str(bad.value)


def test_a_key_file_that_is_not_a_key_names_the_file_not_the_content(tmp_path):
    path = tmp_path / "shadow"
    path.write_text(f"root:{SECRET}:19000:0:99999:7:::\n")
    with pytest.raises(ConfigError) as bad:
        make_plugin(str(path))
    assert f"tsig_key_file: {path}: not one BIND key statement" in str(bad.value)
    assert SECRET not in str(bad.value)

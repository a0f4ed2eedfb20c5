"""ush's lease commands on a fake world (tests.test_ush's Harness): the
arguments sent to the leases plugin's queries, usage errors, start
--lease, the table and the help."""

import re

from tests.test_ush import Harness, full, sample_world, ush


def lease_world():
    world = sample_world()
    asked = []

    def answer(query):
        def handler(user, admin, args):
            asked.append((query, args))
            rows = [{"name": full("horton"), "owner": user, "state": "run",
                     "expires": 1_900_000_000.0, "remaining": 5400, "action": "shutdown"},
                    {"name": full("usher"), "owner": user, "state": "run", "expires": None,
                     "remaining": None, "action": "shutdown"}]
            return rows if query == "leases.list" else rows[:1]
        return handler
    world.queries = {"leases.list": answer("leases.list"), "leases.renew": answer("leases.renew")}
    return world, asked


def test_lease_shows_and_renews_through_the_queries():
    world, asked = lease_world()
    h = Harness(world)
    h.connect()
    shown = h.run("lease")
    assert asked[-1] == ("leases.list", {})
    assert "1 lease (2 VMs):" in shown
    assert re.search(r"horton\S*\s+run\s+2030-03-17 17:46:40 UTC\s+1h30m\s+shutdown", shown)
    assert re.search(r"usher\S*\s+run\s+no lease\s+-\s+shutdown", shown)
    h.run("lease -n web")
    assert asked[-1] == ("leases.list", {"cluster": "web"})
    h.run("lease '[1-2].web' horton")
    assert asked[-1] == ("leases.list", {"vms": ["1.web", "2.web", "horton"]})
    renewed = h.run("lease renew horton 90m")
    assert asked[-1] == ("leases.renew", {"vms": ["horton"], "duration": "1h30m"})
    assert "Renewed 1 lease for 1h30m:" in renewed
    h.run("lease renew -n web -o bob 1d")
    assert asked[-1] == ("leases.renew", {"cluster": "web", "owner": "bob", "duration": "1d"})


def test_lease_usage_errors_send_nothing():
    world, asked = lease_world()
    h = Harness(world)
    h.connect()
    for line, message in (("lease renew", "needs VM names or -n CLUSTER, then a DURATION"),
                          ("lease renew 2h", "before the DURATION"),
                          ("lease renew horton soon", "'soon' is not a duration"),
                          ("lease renew horton 0s", "shorter than 1s"),
                          ("lease -n web horton", "not both"),
                          ("lease -n 'Bad!'", "invalid cluster name"),
                          ("lease -o 'Bob Smith'", "invalid user name")):
        assert message in h.run(line), line
    assert asked == []


def test_start_lease_goes_as_the_lease_argument():
    world, _asked = lease_world()
    h = Harness(world)
    h.connect()
    h.run("start --lease 2h -n web -c 2")
    assert h.sent("start")[-1][1]["args"] == {"lease": "2h"}
    assert "given both" in h.run("start --lease 2h --arg lease=3h web1")
    assert "not a duration" in h.run("start --lease soon web1")


def test_lease_help():
    h = Harness()
    output = h.run("help lease")
    assert output.splitlines()[1].startswith("usage: lease [-o USER] [-n CLUSTER | VM ...]")
    parser = ush.build_parsers()["lease"]
    for action in parser._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert re.search(rf"(^|[\s\[(,]){re.escape(option)}\b", output), option
    assert "lease renew 3.web 2h" in output
    assert re.search(r"^  lease ", h.run("help"), re.M)
    assert "--lease DURATION" in h.run("help start")

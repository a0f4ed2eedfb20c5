"""Round-robin placement's ranking (plugins/roundrobin.py): the rotation
after the last host used, by name, whatever the candidates; the sorted
candidates are kept between calls (a start of thousands of VMs on thousands
of hosts ranks the same candidates once per VM)."""

import random

from plugins.roundrobin import Plugin


def reference(candidates, last):
    ordered = sorted(candidates)
    if last is None:
        return ordered
    return [h for h in ordered if h > last] + [h for h in ordered if h <= last]


def plugin():
    return Plugin({"order": 50}, api=None)


def test_rank_rotates_after_the_last_host_placed():
    rr = plugin()
    hosts = ["lnm3", "lnm1", "lnm2"]
    assert rr.rank("vm", None, hosts, None, None) == ["lnm1", "lnm2", "lnm3"]
    rr.placed("vm", "lnm2", None, None, None)
    assert rr.rank("vm", None, hosts, None, None) == ["lnm3", "lnm1", "lnm2"]
    rr.placed("vm", "lnm3", None, None, None)
    assert rr.rank("vm", None, hosts, None, None) == ["lnm1", "lnm2", "lnm3"]


def test_rank_matches_the_plain_rotation_as_candidates_change():
    rr, rng = plugin(), random.Random(16)
    pool = [f"lnm{n}" for n in range(1, 60)]
    last = None
    for _ in range(300):
        candidates = rng.sample(pool, rng.randint(1, len(pool))) if rng.random() < 0.3 \
            else (rr._ranked_candidates or pool)
        ranked = rr.rank("vm", None, list(candidates), None, None)
        assert ranked == reference(candidates, last)
        ranked.reverse()            # the caller's copy: the cache is not touched
        if rng.random() < 0.8:
            last = rng.choice(pool)   # a host that left is still a place in the rotation
            rr.placed("vm", last, None, None, None)

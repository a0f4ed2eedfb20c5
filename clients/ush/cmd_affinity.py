"""ush's affinity command (issue 15): show or set the affinity rule of a
virtual cluster (apart: its VMs on separate hosts; together: on one host)."""

from usher import naming
from usher.cliargs import UsageError
from usher.errors import InvalidRequest

from .outcome import Call, Outcome

RULE_WORDS = ("apart", "together", "none")


def format_affinity(result):
    """One cluster's rule and where its active VMs run, for people."""
    rule = result.get("rule")
    head = (f"cluster {result['cluster']} ({result['owner']}): "
            + (f"affinity {rule}" if rule else "no affinity rule"))
    hosts = result.get("hosts") or {}
    where = ", ".join(f"{host} ({count})" for host, count in sorted(hosts.items()))
    lines = [head, f"{result.get('vms', 0)} VMs" + (f", active on {where}" if where else "")]
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)


def check_cluster_word(cluster):
    """CLUSTER or OWNER/CLUSTER (administrators), checked before sending."""
    owner, slash, name = cluster.strip().lower().rpartition("/")
    try:
        if slash:
            naming.check_user(owner)
        naming.check_label(name, "cluster name")
    except InvalidRequest as exc:
        raise UsageError(str(exc), "affinity") from None
    return cluster.strip().lower()


async def cmd_affinity(shell, args):
    if args.cluster is None:
        raise UsageError("give the cluster: affinity -n CLUSTER [apart|together|none]",
                         "affinity")
    cluster = check_cluster_word(args.cluster)
    rule = args.rule

    async def affinity():
        result = await shell.live_client().affinity(cluster, rule)
        return Outcome(format_affinity(result), result)
    return Call(affinity)


def register(declare):
    parser = declare("affinity", cmd_affinity)
    parser.add_argument("-n", "--cluster")
    parser.add_argument("rule", nargs="?", choices=RULE_WORDS)

"""The online help of ush: one entry per command, plus a few topics.

The usage lines here are also the usage lines of the commands' argument
parsers, so ``help start`` and a mistyped ``start`` agree.

Over 600 lines: it is the manual's text, one entry per command and topic,
with no logic to split.
"""

import dataclasses
import textwrap

from usher import errors, states


@dataclasses.dataclass(frozen=True)
class HelpEntry:
    summary: str
    usage: str  # empty for topics
    text: str


def _entry(summary, usage, text):
    return HelpEntry(summary, textwrap.dedent(usage).strip("\n"), textwrap.dedent(text).strip("\n"))


SELECTION_OPTIONS = """\
    Choosing VMs (any mix; the VMs selected are the union):
      VM              a VM name: the short name you started it with
                      ("3.sneetch") or its full name
                      ("3.sneetch.alice.usher.example.org")
      [RANGE]         brackets expand like pdsh/Slurm: "[1-5].sneetch",
                      "[1-3,7,10-12].web", "node[01-04].db" (keeps the zeros)
      -n, --cluster CLUSTER
                      every VM of the virtual cluster (repeatable)
      -r, --regex REGEX
                      every VM whose full name matches the regular expression
                      (RE2 syntax, as Python's without backreferences or
                      lookaround; at most 256 characters; searched anywhere
                      in the name: anchor with ^ and $); quote it so the
                      shell leaves it alone
      --lnm LNM       only the VMs on this LNM (host): a name, a range
                      ("vmm[50-59]"), /REGEX/ or ~REGEX (repeatable); alone,
                      every VM you may see on it. The controller resolves
                      it: an LNM it does not know is an error
    Names are checked against your cached VM list before anything is sent:
    an unknown name, a malformed range or regular expression is an error
    and no VM is touched. One command may name at most 10,000 VMs (a range
    counts as every name it expands to) and carry at most 32 ranges and
    regular expressions; the site may set other limits.
"""

VERBOSE_NOTE = """\
Results of more than 10 VMs are summed up: VMs with the same
outcome or the same reason on one line, their names as ranges
("[372-1000].big", which you can paste into the next command);
-v (--verbose) lists each VM."""

_OPERATIONS = {
    "pause": (
        "Pause VMs, keeping their memory resident",
        """\
        The VM stops being scheduled but keeps its memory on its host; resume
        continues it instantly. A paused VM still uses its host's memory.""",
        "pause 3.sneetch\n  pause -n sneetch\n  pause '[1-5].sneetch' web1"),
    "resume": (
        "Resume paused VMs",
        """\
        Continues a VM that was paused. For a hibernated VM use restore.""",
        "resume 3.sneetch\n  resume -r '^[0-9]+\\.sneetch\\.'"),
    "shutdown": (
        "Halt VMs cleanly (ACPI power button)",
        """\
        Asks the guest operating system to shut down, as a power button would;
        the VM ends in state shutoff and can be started again with start NAME.
        A guest that has not shut down after its LNM's shutdown_timeout (60
        seconds unless the site set another) is powered off hard, as destroy
        would: shutdown always ends with the VM off.""",
        "shutdown 3.sneetch\n  shutdown -n sneetch"),
    "reboot": (
        "Reboot VMs (guest shutdown and restart)",
        """\
        Asks the guest to restart. The VM keeps its name, host and addresses.
        A hung guest may ignore this: use cycle to force a restart.""",
        "reboot 3.sneetch\n  reboot -n sneetch"),
    "hibernate": (
        "Save VMs' memory to disk and stop them",
        """\
        Writes each VM's memory image to storage on its host and frees the
        memory; the VM ends in state hibernated. restore brings it back exactly
        where it was (processes, open connections that have not timed out).""",
        "hibernate -n sneetch\n  hibernate 3.sneetch 4.sneetch"),
    "restore": (
        "Bring hibernated VMs back to the run state",
        """\
        Loads the memory image saved by hibernate and continues the VM.""",
        "restore -n sneetch\n  restore 3.sneetch"),
    "destroy": (
        "Power VMs off at once (hard shutdown), keeping them",
        """\
        A hard power-off, like pulling the plug: the guest gets no chance to
        shut down (unsaved data in it is lost). The VM is kept, in state
        shutoff, with its name, host and disk: start NAME boots it again. To
        remove a VM, use delete.
        In the interactive shell, destroying more than one VM asks first
        (-y, --yes: do not ask); one-shot mode never asks.""",
        "destroy 3.sneetch\n  destroy -n sneetch\n  destroy -y '[6-10].sneetch'"),
    "cycle": (
        "Destroy and restart VMs (hard reset)",
        """\
        Powers a VM off at once and boots it again on the same host, like a
        reset button. Use it when reboot does not help; cycle also boots a
        shut-off VM.
        In the interactive shell, cycling more than one VM asks first (-y,
        --yes: do not ask); one-shot mode never asks.""",
        "cycle 3.sneetch\n  cycle -n sneetch"),
    "delete": (
        "Remove VMs for good",
        """\
        Removes VMs that are off (shutoff or hibernated): their definition and
        any hibernation image on their host, then their records. They
        disappear from your list, and the site's plugins release what they
        held (addresses, DNS names, leases, per-VM disk trees). A VM that went missing from its host is
        deleted at once (only its record was left). This cannot be undone.
        A VM that runs or is paused is refused: shut it down or destroy it
        first, or give --force to power it off hard and delete it in one step.
        In the interactive shell, deleting more than one VM asks first (-y,
        --yes: do not ask); one-shot mode never asks, so check with
        'list -r REGEX' or 'list -n CLUSTER' first.""",
        "delete 3.sneetch\n  delete -n sneetch\n  delete --force -y '[6-10].sneetch'"),
}

# Extra options of the operations that take them, for their usage lines.
_OPERATION_OPTIONS = {"destroy": "[-y] ", "cycle": "[-y] ", "delete": "[-y] [--force] "}


def _operation_entry(operation, summary, details, examples):
    allowed = ", ".join(s for s in states.ALL_STATES
                        if s in states.OPERATION_PRECONDITIONS[operation])
    result = states.OPERATION_RESULT[operation]
    outcome = (f"The VMs end in state {result}." if result
               else "The VMs are removed.")
    if operation == "delete":
        outcome += "\nWith --force also from: " + ", ".join(
            s for s in states.ALL_STATES if s in states.DELETE_FORCED_FROM) + " (powered off first)."
    already = states.ALREADY.get(operation)
    if already:
        outcome += (f" A VM already {' or '.join(sorted(already))} is done at once "
                    "(reported as already).")
    text = (
        f"{summary}.\n\n"
        f"{textwrap.dedent(details)}\n\n"
        + textwrap.fill(f"Allowed from state: {allowed}. {outcome} The controller "
                        "refuses VMs in any other state (each refusal is listed, the "
                        "others proceed).", 72) + "\n\n"
        f"{textwrap.dedent(SELECTION_OPTIONS)}\n"
        "The result lists each VM with its new state (\"already\" for a VM\n"
        "that was in it: that is success too), then any VM the operation failed\n"
        "on with the reason; in one-shot mode the exit status is 1 if any VM\n"
        "failed (see 'help exit-codes'). "
        f"{VERBOSE_NOTE}\n"
        "The result reports the VMs the command changed: they get no [notice]\n"
        "lines meanwhile. On a terminal, 'ush OPERATION ...' shows the counts\n"
        "so far on one line while it runs.\n\n"
        f"Examples:\n  {examples}")
    return HelpEntry(summary, f"{operation} [-v] {_OPERATION_OPTIONS.get(operation, '')}"
                     "[-n CLUSTER]... [-r REGEX] [--lnm LNM]... [VM ...]",
                     text)


COMMANDS = {}

COMMANDS["connect"] = _entry(
    "Connect and log in to the Usher controller",
    "connect [[USER@]HOST[:PORT]]",
    """\
    Connect to the Usher controller over TLS and log in.

    With no argument, ush uses controller_host, controller_port and username
    from the [ush] section of its configuration (username defaults to your
    login name). An argument overrides them:
      connect ctl.example.org
      connect bob@ctl.example.org:7390

    controller_host may list several controllers (high availability, e.g.
    controller_host = ctl1.example.org, ctl2.example.org:7390): with no
    argument ush tries each in turn, when connecting and whenever the
    connection drops; a standby controller refuses the login (standby) and
    ush goes on to the next, so it always ends up with the active one.

    The password is the configuration's password option, if set and you did
    not name another user; otherwise ush asks for it at a "Password:" prompt
    (not echoed, never written to the history file). Ctrl-C or Ctrl-D at the
    prompt gives up.

    The controller's certificate must be signed by the CA in ssl_ca_file and
    carry the name controller_tls_name (when unset, the host name you
    connect to; with several controllers one name for all, or one name per
    entry of controller_host).

    On success the controller sends the list of your VMs (only those of the
    clusters named in the clusters option, if any); ush keeps this copy up to
    date, so 'list' answers from it without asking the controller, and
    changes made by anyone show up as [notice] lines.

    Like every command that talks to the controller, connect first prints
    "<Command N result pending...>", and later "Command N result:" with the
    outcome ("Connected" or the reason for failing). Meanwhile you may type
    other commands.

    If the connection drops, ush reconnects by itself with growing delays and
    tells you with [notice] lines. To connect elsewhere, disconnect first.""")

COMMANDS["disconnect"] = _entry(
    "Log out and close the connection to the controller",
    "disconnect",
    """\
    Close the connection to the controller and stop any automatic
    reconnection. Your VMs are not affected: they keep running, and you can
    connect again (or use 'reconnect') later. Commands still pending when
    you disconnect fail.""")

COMMANDS["reconnect"] = _entry(
    "Connect again with the same host, user and password",
    "reconnect",
    """\
    Close the connection (if any) and log in again to the same controller
    with the same user and password, without asking for the password again.
    The cached VM list is thrown away and fetched anew, and differences
    are shown as [notice] lines. Useful after 'disconnect', or when the
    automatic reconnection is waiting out a long delay.""")

COMMANDS["list"] = _entry(
    "List your VMs (from the local cache, or ask the controller)",
    "list [-s] [-a] [-n CLUSTER]... [-r REGEX] [--lnm LNM]... [VM ...]",
    """\
    List VMs as a table: VM name, state and the LNM (host) running it, and,
    where the site manages IP addresses, the address each VM was given
    (blank for one without; see 'help addresses').

    Without -s or -a the list comes from ush's cached copy of your VMs, kept
    current by the controller's notifications: it answers at once, without a
    remote call (no "Command N" lines).

    Options:
      -s, --status    ask the controller for current details and add columns:
                      cluster, memory and virtual CPUs, then the VM's resource
                      use (see 'help monitoring'): CPU in percent of one host
                      CPU averaged over 1, 5 and 15 minutes, network in/out
                      and disk read/write per second and memory in use over
                      the last minute ("n/a": its hypervisor does not report
                      it; "-": no figures, e.g. shut off)
      -a, --all       ask the controller instead of the cache, for every VM
                      you are allowed to see: your own; administrators see
                      every user's VMs and the hosts' unmanaged ones (an
                      owner column then appears). A site may let every user
                      see all VMs (user_visibility = all in ctrl.config);
                      another user's args are never shown but to
                      administrators
      -n, --cluster CLUSTER
                      only VMs of this virtual cluster (repeatable)
      -r, --regex REGEX
                      only VMs whose full name matches the regular expression
                      (RE2 syntax: see 'help selections')
      --lnm LNM       only VMs on this LNM: a name, a range, /REGEX/ or
                      ~REGEX (repeatable); asks the controller
      VM ...          only these VMs (names and [ranges] as for pause); naming
                      another user's VM is refused unless you may see it

    With no selection, all VMs are listed, sorted by name (numbers in names
    sort numerically: 2.sneetch before 10.sneetch).

    States: run, paused, hibernated, shutoff, starting, migrating (while a
    command is in progress), lost (its host's LNM stopped answering),
    missing (vanished from its host), unknown. See 'help states'.

    Examples:
      list
      list -n sneetch
      list -s '[1-4].sneetch'
      list -r 'web' -n sneetch
      list --lnm vmm47
      list -n sneetch --lnm '~^vmm5'""")

COMMANDS["list_lnm"] = _entry(
    "List the local node managers (the physical hosts)",
    "list_lnm [-s] [LNM ...]",
    """\
    List the LNMs connected to the controller: one per physical host running
    a VMM. Columns: LNM name, the number of VMs it runs, its CPUs and memory,
    the memory committed on it, and whether it is connected; then "test"
    (TEST) when some LNM runs an embedded libvirt test host
    (test_host = yes: the sandbox's; its VMs run nothing; --json:
    "test_host"); then, when a host has any, its holds: why it takes no new
    VMs (maintenance, fenced, powered_down; --json shows each hold's
    details).

    Two memory figures, not to be confused:
      committed       the configured memory of the VMs placed on the host
                      (running, paused, starting, migrating there, lost):
                      what placement counts when it says a host has no room
                      ("VMs' configured memory commits 32768 of 32768 MiB")
      measured free   (-s) the free memory the host itself last measured; a
                      VM uses less than it was given, so a host full by
                      commitment may measure gigabytes free

    Options:
      -s, --status    add the host's current figures as the controller reports
                      them: measured free memory, CPU in percent of the whole
                      host averaged over 1, 5 and 15 minutes, network, disk
                      and memory over the last minute, where the figures come
                      from ("libvirt", or "simulated:PROFILE" when the LNM's
                      simulated_load option makes them up for a test host)
                      and their age ("stats age": "12s"; "4m stale" when older
                      than 60 s or its LNM is not connected: the last it
                      reported); see 'help monitoring'
      LNM ...         only these LNMs: exact names, ranges ("vmm[40-49]"), or
                      regular expressions written /REGEX/ or ~REGEX
                      ("/^vmm4/", "~rack2")

    This always asks the controller ("Command N" lines). On a terminal the
    table fits its width ($COLUMNS if set): the columns that matter least
    (the 5- and 15-minute averages, rates, the host's details) are left out
    and a line says which; --json, or output to a pipe or file, has them all.

    Examples:
      list_lnm
      list_lnm -s vmm47.usher.example.org
      list_lnm '~^vmm[4-5]'""")

COMMANDS["start"] = _entry(
    "Start new VMs in a virtual cluster, or start VMs by name",
    """\
    start -n CLUSTER -c COUNT [--affinity apart|together] [--lease DURATION]
                              [--arg KEY=VALUE]... [-v] [LNM ...]
           start [-l LNM]... [--affinity apart|together] [--lease DURATION]
                 [--arg KEY=VALUE]... [-v] VM ...""",
    """\
    Start VMs. The controller authorizes the request, its placement policy
    picks the hosts, and the LNMs boot the VMs; the result lists where each
    one started.

    First form: COUNT new VMs in virtual cluster CLUSTER. The controller
    names them NUMBER.CLUSTER.USER.DOMAIN, e.g. "start -n sneetch -c 10"
    as alice gives 1.sneetch.alice.usher.example.org and so on. Cluster
    names are DNS labels: lower-case letters, digits and hyphens.
    Arguments after the options name LNMs you would like the VMs on.

    Second form: the VMs named (ranges allowed: "start '[1-3].web'"). The
    part of a name after the first dot is its cluster ("3.web" is in
    cluster web; a name without a dot goes to cluster "default"). A VM you
    shut down can be started again this way.

    Options:
      -n, --cluster CLUSTER   cluster of the new VMs (first form)
      -c, --count COUNT       how many VMs to start (first form)
      -v, --verbose           list each VM in the result (see below)
      -l, --lnm LNM           preferred LNM (repeatable; names, ranges,
                              /REGEX/ or ~REGEX as for list_lnm)
      --arg KEY=VALUE         an extra request argument (repeatable): memory_mib
                              and vcpus size the VMs (e.g. --arg memory_mib=1024);
                              other keys (--arg image=centos5) go to the site's
                              plugins, and which mean something depends on them
      --affinity apart|together
                              the cluster's affinity rule (see 'help affinity'):
                              apart keeps its VMs on separate hosts, together
                              on one; refused if the cluster has VMs and
                              another rule
      --lease DURATION        how long the VMs may live (90s, 30m, 2h, 1d,
                              1h30m), when the site runs the leases plugin:
                              you are warned before the lease ends, then the
                              site's action (shutdown, hibernate, destroy or
                              delete) runs; see 'help lease'. The site may
                              give a lease by default, bound it or require one

    Preferred LNMs are a suggestion: the controller's policy decides, and an
    empty list lets it place the VMs anywhere.

    The result reads like
      Controller started 4 VMs in 2 seconds:
      1.sneetch.alice.usher.example.org started on vmm43.usher.example.org
      ...
    followed by any VMs that failed to start with the reason, and any note
    from the controller (for instance that a plugin changed the request).
    In one-shot mode the exit status is 1 if any VM failed. More than 10
    VMs are summed up (-v, --verbose: each VM):
      Controller started 128 VMs in 3 seconds: [1-128].big (64 on vmm43, 64 on vmm44)
      Could not start 872 VMs ([129-1000].big): no LNM can start it ...
    On a terminal, 'ush start ...' shows the counts so far on one line
    while it runs (started, starting, failed).

    Examples:
      start -n sneetch -c 10
      start -n web -c 2 --arg memory_mib=2048 vmm47 vmm52
      start 3.sneetch
      start -l vmm47 '[11-12].sneetch'
      start -n db -c 3 --affinity apart
      start -n batch -c 4 --lease 2h""")

for _operation, (_summary, _details, _examples) in _OPERATIONS.items():
    COMMANDS[_operation] = _operation_entry(_operation, _summary, _details, _examples)

COMMANDS["migrate"] = _entry(
    "Move VMs to other hosts (live migration)",
    """\
    migrate [-v] VM LNM
           migrate [-v] [-n CLUSTER]... [-r REGEX] [--from LNM]... [VM ...] --to LNM [LNM ...]
           migrate [-v] [-n CLUSTER]... [-r REGEX] [VM ...] --from LNM...""",
    """\
    Move running VMs to other physical hosts, live where the VMM supports it
    (the VM keeps running; its network connections survive). Where the VMM
    cannot migrate live, the controller hibernates the VM, moves its image
    and restores it on the new host: it pauses for a while but nothing is
    lost.

    First form: one VM to one LNM: "migrate 3.sneetch vmm52".
    Second form: any selection of VMs, then --to and one or more LNMs to
    spread them over (--to must come after the VMs):
      -n, --cluster CLUSTER   every VM of the virtual cluster (repeatable)
      -r, --regex REGEX       every VM whose full name matches
      VM ...                  VM names and [ranges] (see 'help selections')
      --from LNM              only the VMs on this LNM (repeatable; the same
                              as --lnm); alone, every VM you may see on it
      --to LNM [LNM ...]      where the VMs should go
      -v, --verbose           list each VM in the result
    Third form: --from without --to: the controller's placement chooses a
    host for each VM (to empty a host for maintenance, administrators use
    'evacuate').

    LNMs are exact names, ranges ("vmm[50-59]"), or regular expressions
    written /REGEX/ or ~REGEX. The list is a suggestion: the controller's
    policy may choose other hosts or refuse.

    The result lists each VM moved ("... moved from vmm47 to vmm52"), then
    any failures with the reason (more than 10 VMs: summed up by hosts and
    reasons; -v, --verbose: each VM). VMs show state migrating meanwhile;
    on a terminal 'ush migrate ...' shows the counts so far on one line.

    Examples:
      migrate 3.sneetch vmm52.usher.example.org
      migrate -n sneetch --to '~^vmm5'
      migrate '[1-4].sneetch' --to vmm50 vmm51
      migrate --from vmm47
      migrate -n sneetch --from vmm47 --to vmm52""")

COMMANDS["affinity"] = _entry(
    "Show or set a virtual cluster's affinity rule (apart, together)",
    "affinity -n CLUSTER [apart|together|none]",
    """\
    Without a rule, shows the cluster's rule and the hosts its VMs run on.
    With one, sets it:
      apart      no two VMs of the cluster on one host (one host's failure
                 takes one of them)
      together   every VM of the cluster on one host
      none       no rule
    Placement honours the rule for new VMs, VMs started again, migrations,
    evacuations of hosts in maintenance and HA restarts; the rebalancer never
    moves a VM against it. A VM that cannot be placed under the rule is
    refused with the reason, naming the rule and each host (or, if the site
    chose best effort, placed anyway with a note). The rule stays until you
    set it to none, even while the cluster has no VMs. Setting a rule that
    the cluster's VMs do not meet now is accepted with a note: migrate them
    (a together cluster in one request: migrate -n CLUSTER --to LNM).
    'start -n CLUSTER -c COUNT --affinity apart' sets it at start.
    Administrators may name another user's cluster as OWNER/CLUSTER.

    Examples:
      affinity -n db apart
      affinity -n db
      affinity -n web together
      affinity -n db none""")

COMMANDS["query"] = _entry(
    "Ask a query that a plugin answers (e.g. dns.status)",
    "query NAME [KEY=VALUE ...]",
    """\
    Plugins answer queries of their own: the SQL plugin's ipam.ranges and
    ipam.addresses (also the commands ranges and addresses), the DNS
    plugin's dns.status (administrators: names waiting to be written to
    the DNS server, since when it has been failing, the last error, how
    many updates were applied). Each KEY=VALUE is an argument of the
    query; a VALUE that reads as JSON (a number, true, a list) is that,
    otherwise text. The plugin decides what the caller may see; an
    unknown query is an error.

    Examples:
      query dns.status
      query ipam.addresses owner=bob
      ush --json query dns.status""")

COMMANDS["plugins"] = _entry(
    "List the available plugins and the event chains (administrators)",
    "plugins",
    """\
    Show the plugins the controller can load (Usher's own and those in its
    plugin_dir) with a line about each, then every registration: the event,
    the plugin's order on that event's chain (lower runs first), its
    configuration file, its timeout and, for timer registrations, the
    interval between calls. Only administrators may see or change plugins.

    Examples:
      plugins
      ush --json plugins""")

COMMANDS["register_plugin"] = _entry(
    "Put a plugin on one or more event chains (administrators)",
    "register_plugin [-o ORDER] PLUGIN EVENT[,EVENT...] [CONFIG_FILE]",
    """\
    Register an available plugin for events while the controller runs: the
    paper's register_plugin(plugin name, event, configuration file). The
    plugin is loaded (once per configuration file: one instance serves all
    its events), its configuration file is read on the controller's host by
    the usual rules, and it is placed on each event's chain by its order.

      PLUGIN          a name listed by 'plugins'
      EVENT           start_request, migrate_request, list_request,
                      <operation>_request, register_vm, start_complete,
                      migrate_complete, op_complete, vm_state_changed,
                      vm_lost, vm_missing, vm_unmanaged, vm_adopted,
                      vm_removed, lnm_connected, lnm_disconnected,
                      user_authenticated, error, or timer (called every
                      'interval' seconds of its configuration); several
                      separated by commas
      CONFIG_FILE     an absolute path on the controller's host (default:
                      the plugin's defaults)
      -o, --order ORDER
                      position on the chains, overriding the configuration

    Registrations made here last until the controller stops; put lasting
    ones in the [[plugins]] section of ctrl.config.

    Examples:
      register_plugin limits start_request,list_request /etc/usher/limits.config
      register_plugin -o 40 pack start_request,migrate_request
      register_plugin rebalancer timer,lnm_connected /etc/usher/rebalancer.config""")

COMMANDS["unregister_plugin"] = _entry(
    "Take a plugin off event chains (administrators)",
    "unregister_plugin PLUGIN [EVENT[,EVENT...]]",
    """\
    Remove a plugin from the given event chains, or from every chain when no
    event is given. A plugin on a timer stops being called; a plugin no
    chain uses any more is unloaded. A request already going down a chain
    no longer reaches the plugin.

    Examples:
      unregister_plugin roundrobin
      unregister_plugin limits list_request""")

COMMANDS["forget_lnm"] = _entry(
    "Retire a host that will not come back (administrators)",
    "forget_lnm LNM",
    """\
    Forget a disconnected LNM: the controller drops it from its persisted
    list (so it is no longer told when the controller restarts) and forgets
    the VMs last known on it, which are lost. Use it when a host has been
    retired or rebuilt; a host that is merely down comes back on its own and
    its VMs take their real states again. A connected LNM is refused: stop
    its usherlnm first.

    Example:
      forget_lnm vmm47""")

WAIT_OPTIONS = """\
      --wait          print the progress (a line of counts whenever they
                      change) until the evacuation is done, then the summary
      --interval SECONDS
                      how often --wait asks (default 2)"""

COMMANDS["maintenance"] = _entry(
    "Put a host into maintenance or take it out (administrators)",
    "maintenance LNM on|off [--reason TEXT] [--evacuate] [--concurrency N] [--wait] "
    "[--interval SECONDS]",
    """\
    'maintenance LNM on' holds the host: the controller places no new VMs
    on it (a start or migration asking for it is refused with the reason),
    and the rebalancer neither moves VMs off it nor onto it. The VMs already
    there keep running unless you evacuate them. 'maintenance LNM off'
    releases it: it is a target again at once (an evacuation under way
    starts no more moves; those running finish). The hold survives a
    controller restart, and list_lnm shows it.

    Options (with on):
      --reason TEXT   why, shown to users whose requests it refuses
      --evacuate      also live-migrate every VM off it (as 'evacuate')
      --concurrency N at most N migrations at once (1-64; default the
                      controller's evacuation_concurrency, 4)
""" + WAIT_OPTIONS + """

    Examples:
      maintenance vmm47 on --reason 'new disks'
      maintenance vmm47 on --evacuate --wait
      maintenance vmm47 off""")

COMMANDS["evacuate"] = _entry(
    "Move every VM off a host, into maintenance (administrators)",
    "evacuate LNM [--reason TEXT] [--concurrency N] [--wait] [--interval SECONDS]",
    """\
    Put the host into maintenance (see 'help maintenance') and live-migrate
    every VM off it, at most N at once. The controller's policies choose
    each VM's new host (placement plugins, limits, affinity rules), as for
    'migrate'. Each VM moves on its own: one that fails does not stop the
    others, and is not tried again in this evacuation. VMs that cannot move
    (shut off or hibernated, busy, no host with room, a failed migration)
    are listed with the reason; the host stays in maintenance. A controller
    restarted meanwhile resumes the evacuation once the host is back. The
    exit status is 1 if any VM could not move.

    Options:
      --reason TEXT   why the host goes into maintenance
      --concurrency N at most N migrations at once (1-64; default 4)
""" + WAIT_OPTIONS + """

    Examples:
      evacuate vmm47 --wait
      evacuate vmm47 --concurrency 8 --reason 'firmware update'""")

COMMANDS["evacuation"] = _entry(
    "Show a host's maintenance and evacuation progress (administrators)",
    "evacuation LNM [--wait] [--interval SECONDS]",
    """\
    Show whether the host is in maintenance (why, set by whom) and how far
    its last evacuation is: VMs moved and where to, moving now, waiting,
    and each VM that could not move with the reason.

    Options:
""" + WAIT_OPTIONS + """

    Examples:
      evacuation vmm47
      evacuation vmm47 --wait""")

# (issue 15, part B)
COMMANDS["fenced"] = _entry(
    "Say that a lost host is off, so its VMs may be restarted elsewhere (administrators)",
    "fenced LNM [--evidence TEXT]",
    """\
    Tell the controller that the host of a disconnected LNM is off: powered
    down, unplugged, fenced by hand. It asks nothing and checks nothing: it is
    your word, and Usher acts on it. Only then may the HA plugin restart that
    LNM's lost VMs on other hosts; without it (or the site's fence agent) a
    lost host's VMs stay lost, because a host that is only cut off from the
    network still runs them, and a second copy would corrupt their disks.
    Never say it of a host you have not seen off.

    The host takes no new VMs while it is fenced. When it comes back, the
    copies it still has of the VMs restarted elsewhere are deleted (or,
    where the site's stale_copies policy is hold, listed for you to remove),
    and then it is used again; its VMs that were not restarted come back as
    they are. A connected LNM is refused.

    Options:
      --evidence TEXT   what you saw (kept with the hold: "PDU outlet 4 off")

    Example:
      fenced vmm47 --evidence 'powered off at the console, ticket 1234'""")

COMMANDS["top"] = _entry(
    "A live view of the hosts and their busiest VMs",
    "top [-c COUNT] [-i SECONDS] [--iterations N] [LNM ...]",
    """\
    Show every host (or the LNMs named) with its figures, then the COUNT
    busiest VMs on them by 1-minute CPU average: your own VMs, or every VM
    for administrators (and for everyone where the site sets
    user_visibility = all). On a terminal it redraws the screen every
    SECONDS: 'ush top' until Ctrl-C (exit status 130); at the ush> prompt
    until Enter or Ctrl-C gives the prompt back (its result says how many
    views it showed). In scripts it shows one view, or N views with
    --iterations N; with --json each view is one line of JSON.

    Options:
      -c, --count COUNT   how many VMs to show (default 10)
      -i, --interval SECONDS
                          seconds between views (default 2)
      --iterations N      show N views, then stop
      LNM ...             only these LNMs (names, ranges, /REGEX/ or ~REGEX)

    The figures are the LNMs' 1/5/15-minute averages as last reported to
    the controller (see 'help monitoring').

    Examples:
      top
      top -c 20 '~^vmm4'
      ush --json top -c 5 --iterations 3""")

COMMANDS["ranges"] = _entry(
    "Show the IP address ranges assigned to you, and how many are free",
    "ranges [-o USER]",
    """\
    Where the site manages IP addresses (the SQL plugin), administrators
    assign ranges of addresses of their subnets to users, and optionally to
    one of their virtual clusters; the VMs you start get their addresses
    from your ranges, the VMs of one cluster from one range, side by side.
    This shows each of your ranges, and the open ones (owner "anyone") that
    any user's VMs may take addresses from: its number, subnet, first and
    last address, the cluster it is reserved for ("-": any) and how many
    addresses in it are free. A start that needs more addresses than
    are free is refused as a whole, naming the range's owner and cluster.

    Options:
      -o, --owner USER
                      (administrators) the ranges of USER; without it an
                      administrator sees every range, with an owner column

    A site without address management answers "no such query: ipam.ranges".

    Examples:
      ranges
      ranges -o alice
      ush --json ranges""")

COMMANDS["addresses"] = _entry(
    "Show the IP addresses your VMs hold",
    "addresses [-o USER]",
    """\
    Each address given to one of your VMs: the address, the VM, whether it
    is reserved (the VM is starting) or used, its cluster, subnet, VLAN (when
    the subnet has one) and the MAC address derived from it. The address
    stays the VM's while it exists (across migrations and restarts of the
    controller) and is freed when the VM is deleted or forgotten.
    'list' shows each VM's address too.

    Options:
      -o, --owner USER
                      (administrators) the addresses of USER's VMs; without
                      it an administrator sees every address held

    Examples:
      addresses
      addresses --owner alice
      ush --json addresses""")

# -- leases (issue 15) --
COMMANDS["lease"] = _entry(
    "Show or renew the leases of your VMs (when they end)",
    """\
    lease [-o USER] [-n CLUSTER | VM ...]
           lease renew [-o USER] (-n CLUSTER | VM ...) DURATION""",
    """\
    A lease is how long a VM may live, when the site runs the leases plugin:
    asked for at start ('start --lease 2h'), or given by the site's policy.
    Before it ends your sessions (ush, the web interface) are warned with
    [notice] lines, e.g.
      [notice] lease: the lease of 3.web.alice.usher.example.org ends in 10m;
               then it is shut down. Renew with: lease renew NAMES DURATION
    and when it ends the site's action runs (shutdown, hibernate, destroy:
    powered off and kept, or delete: removed) and you are told what became
    of the VM.

    'lease' lists your VMs with a lease: when each ends (UTC), the time left
    and what happens then; with VM names or -n CLUSTER it shows those VMs,
    "no lease" for one without.

    'lease renew ... DURATION' makes the leases end DURATION from now (90s,
    30m, 2h, 1d, 1h30m), never later than the site's longest lease allows;
    a VM without a lease gets one. Only a VM's owner or an administrator
    may renew it.

    Options:
      -n, --cluster CLUSTER   every VM of the virtual cluster
      -o, --owner USER        (administrators) USER's VMs; without it an
                              administrator sees every lease

    Examples:
      lease
      lease -n web
      lease renew 3.web 2h
      lease renew -n web 1d""")

COMMANDS["help"] = _entry(
    "Show the list of commands, or help on one command or topic",
    "help [COMMAND | TOPIC]",
    """\
    'help' (or '?') lists the commands and topics; 'help COMMAND' (or
    '? COMMAND', or 'COMMAND -h') explains one of them.""")

COMMANDS["quit"] = _entry(
    "Leave ush (also: exit, Ctrl-D)",
    "quit",
    """\
    Leave the shell. If commands are still pending ush waits for their
    results first (Ctrl-C leaves at once). Your VMs keep running. 'exit' and
    Ctrl-D (end of input) do the same.""")


TOPICS = {}

TOPICS["selections"] = HelpEntry(
    "Naming sets of VMs: names, ranges, clusters, regular expressions",
    "",
    "Commands that act on existing VMs (list, pause ... cycle, migrate) accept\n"
    "VM names, ranges, clusters and regular expressions.\n\n"
    + textwrap.dedent(SELECTION_OPTIONS) + "\n" + textwrap.dedent("""\
    Full names are SHORT.USER.DOMAIN: "start -n sneetch -c 3" as alice in
    domain usher.example.org makes 1.sneetch.alice.usher.example.org to
    3.sneetch.alice.usher.example.org; "3.sneetch" is enough to name one.

    Examples:
      pause 3.sneetch                   one VM
      pause '[1-5].sneetch' 9.sneetch   six VMs
      pause -n sneetch -n web           two whole clusters
      pause -r '^[0-9]*[02468]\\.'      every VM whose number is even

    Quote ranges and regular expressions: ush splits lines like a Unix shell
    (quotes group words, backslashes escape).""").strip("\n"))

TOPICS["states"] = HelpEntry(
    "What the VM states mean",
    "",
    textwrap.dedent("""\
    run         running
    paused      stopped by 'pause'; memory still resident ('resume')
    hibernated  memory saved to disk by 'hibernate' ('restore')
    shutoff     halted ('start NAME' boots it again)
    starting    being started by the controller
    migrating   being moved to another host
    lost        its host's LNM or VMM stopped answering; the controller
                does not know whether the VM still runs
    missing     its LNM reports that it vanished from the host
    unknown     its LNM cannot ask the VMM at the moment

    Which operation is allowed from which state:
    """) + "\n".join(
        f"  {op:<10}  from {', '.join(s for s in states.ALL_STATES if s in states.OPERATION_PRECONDITIONS[op])}"
        for op in states.OPERATIONS))

TOPICS["monitoring"] = _entry(
    "Resource figures: what list -s, list_lnm -s and top show",
    "",
    """\
    Each LNM samples its hypervisor every few seconds and keeps, like the
    kernel's load average, exponentially damped averages over 1, 5 and 15
    minutes of:
      cpu         percent: of one host CPU for a VM (200 = two CPUs busy),
                  of the whole host for an LNM (0-100)
      net in/out  network bytes received and sent per second
      disk r/w    disk bytes read and written per second
      mem used    memory in use (a VM's resident memory, the host's used)
    Rates are shown short: 512 bytes/s, 1.5K, 12M, 1.2G (powers of 1024).
    The 1-minute average moves first when load changes; the 15-minute one
    shows the longer trend.

    "n/a" means the hypervisor does not report that figure: Usher never
    shows a number it did not measure. "stats age" says how old an LNM's
    figures are; "stale" marks those older than 60 s or of an LNM that is
    not connected (a host that went away keeps its last figures).
    An LNM's "measured free" memory is the host's own measure; "committed"
    (list_lnm) is the configured memory of its VMs, which placement counts. libvirt's test driver (the embedded
    test hosts) reports none; an LNM with the simulated_load option fills
    them with simulated load, and its figures say "simulated:PROFILE".
    --json shows every average of every figure.""")

COMMANDS["notices"] = _entry(
    "Turn the [notice] lines on or off (asynchronous news about your VMs)",
    "notices [on|off]",
    """\
    While you are connected the controller tells ush about every change to
    your VMs, whoever caused it, and ush prints one line per change above
    the prompt:
      [notice] 3.sneetch.alice.usher.example.org: run -> paused
      [notice] 3.sneetch.alice.usher.example.org: moved vmm47 -> vmm52
      [notice] 7.web.alice.usher.example.org: new VM, run on vmm44
      [notice] 4.web.alice.usher.example.org: removed
    What your own start, operations and migrations change is reported in
    their result instead, once; notices of other changes that arrive while
    one of them runs are printed after its result. Connection news looks like
      [notice] lost the controller at ctl:7390; reconnecting
      [notice] reconnected to ctl:7390
    and the controller may send notices of its own (maintenance, policy),
    prefixed with their kind, e.g. a lease about to end:
      [notice] lease: the lease of 3.web.alice.usher.example.org ends in 10m; ...

    'notices off' stops them (the VM list stays up to date), 'notices on'
    brings them back, 'notices' says which. To start with them off, set
    notices = no in the [ush] section or run 'ush --no-notices'. One-shot
    mode never prints notices.""")

TOPICS["oneshot"] = _entry(
    "Running one command from a Unix shell or a script (and --json)",
    "",
    """\
    ush [--config FILE]... [--isolated] [--json] COMMAND [ARGUMENTS...]

    connects, runs one command, prints its result and exits, in the manner
    of virsh:
      ush list -n sneetch
      ush start -n sneetch -c 4
      ush --json list | jq -r '.[].name'

    The password comes from the configuration (password, or password_file:
    a file only you can read, its first line); else ush asks for it on the
    terminal, after checking the command line and the configuration. With
    no terminal (cron, CI) ush does not read standard input: it fails at
    once (exit status 3, code no_password). --isolated reads only the
    --config files (as the daemons do).

    Nothing else is asked: destroy, cycle and delete of several VMs, which
    the interactive shell confirms first, run at once here.

    --json prints JSON instead of tables: list and list_lnm print an array
    of objects (list: name, state, lnm, cluster, owner, memory_mib, vcpus,
    ...), start an array of {"name", "lnm"} (with "already": true for a
    VM that was running) and, for failures, {"name", "error", "code"}; the
    operations and migrate print the controller's result object ({"done":
    [...], "failed": [...], "notes": [...]}; a done entry has "already":
    true if the VM was in that state already); errors print {"error": "...",
    "code": "..."}. The exit statuses and codes: 'help exit-codes'.""")

TOPICS["config"] = _entry(
    "The configuration file (ush.config)",
    "",
    """\
    ush reads /etc/usher/ush.config, then ~/.usher/ush.config, then the file
    named by $USHER_USH_CONFIG, then the files given with --config (only
    those with --isolated); later values win key by key. Options of the [ush] section:
      controller_host, controller_port   where the controller listens;
                             controller_host may list several controllers
                             (host[:port], comma-separated): tried in turn,
                             a standby is skipped
      controller_tls_name    name expected in its certificate (None: host;
                             a list: one per controller_host entry)
      ssl_ca_file            the site CA certificate
      username               None: your login name
      password               None: password_file, else ush asks on the
                             terminal (keep the file private if set)
      password_file          a file only you can read; its first line
      history_file           interactive command history (~/.ush_history)
      clusters               only cache and show these clusters (empty: all)
      call_timeout           seconds to wait for the controller's answers
      notices                print [notice] lines (yes; see 'help notices')
    The sample file etc/ush.config.orig documents each option. An invalid
    file stops ush with a message naming the file, line and option.""")

def _wrapped(key, text, width=14):
    lines = textwrap.wrap(text, 72 - width)
    return "\n".join([f"  {key:<{width - 2}}{lines[0]}"]
                     + [" " * width + line for line in lines[1:]])


def exit_status_lines():
    """The exit status table (usher.errors.EXIT_STATUSES) as text."""
    return [_wrapped(str(status), meaning, 7) for status, _, meaning in errors.EXIT_STATUSES]


def error_code_lines():
    """The error code table (usher.errors.ERROR_CODES) as text."""
    return [_wrapped(code, f"({status}) {meaning}", 24)
            for code, (status, meaning) in errors.ERROR_CODES.items()]


def markdown_tables():
    """The two tables as the README shows them (a test keeps it current)."""
    lines = ["| Exit status | Meaning |", "|---|---|"]
    lines += [f"| {status} | {meaning} |" for status, _, meaning in errors.EXIT_STATUSES]
    lines += ["", "| Code | Exit status | Meaning |", "|---|---|---|"]
    lines += [f"| `{code}` | {status} | {meaning} |"
              for code, (status, meaning) in errors.ERROR_CODES.items()]
    return "\n".join(lines)


def exit_status_summary():
    """One line: the exit statuses (for ush --help)."""
    return ("Exit status: " + ", ".join(f"{status} {short}"
                                        for status, short, _ in errors.EXIT_STATUSES)
            + " (type 'ush help exit-codes').")


TOPICS["exit-codes"] = HelpEntry(
    "Exit statuses and the error codes of --json, for scripts",
    "",
    "Exit status of one-shot ush (the usher admin tool uses 0, 1, 2 and 130 alike):\n"
    + "\n".join(exit_status_lines())
    + "\n\nWhen some VMs fail and some succeed the status is 1 (3 if the outcome\n"
    "of one is unknown). A VM already in the state asked for (pause a paused\n"
    "VM, resume or start a running one, shutdown a shut-off one) counts as\n"
    "done: its entry says \"already\".\n\n"
    "With --json an error prints {\"error\": message, \"code\": code}, and each\n"
    "VM that failed {\"name\", \"error\", \"code\"}. The codes never change\n"
    "(usherweb's error bodies use the same); in parentheses, the exit status:\n"
    + "\n".join(error_code_lines()))

ALIASES = {"?": "help", "exit": "quit"}


def lookup(name):
    """-> the HelpEntry of a command, alias or topic, or None."""
    name = ALIASES.get(name, name)
    return COMMANDS.get(name) or TOPICS.get(name)


def render(name):
    """The full help text of a command or topic; KeyError if unknown."""
    entry = lookup(name)
    if entry is None:
        raise KeyError(name)
    if not entry.usage:
        return f"{ALIASES.get(name, name)}: {entry.summary}\n\n{entry.text}"
    return f"usage: {entry.usage}\n\n{entry.text}"


def overview():
    width = max(len(name) for name in (*COMMANDS, *TOPICS)) + 2
    lines = ["Commands (type 'help COMMAND' for details):"]
    lines += [f"  {name:<{width}}{entry.summary}" for name, entry in COMMANDS.items()]
    lines += ["", "Topics (type 'help TOPIC'):"]
    lines += [f"  {name:<{width}}{entry.summary}" for name, entry in TOPICS.items()]
    lines += ["",
              "Commands that talk to the controller print '<Command N result pending...>'",
              "and later 'Command N result:'; you can go on typing meanwhile.",
              "Ctrl-C clears the line, Ctrl-D or 'quit' leaves."]
    return "\n".join(lines)

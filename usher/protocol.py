"""The wire protocols between Usher's processes, in one place.

All links are Perspective Broker over TLS. Bulk VM data travels as JSON
chunks (``usher.records``); everything else as small dicts of primitives.
A VM record has the keys of ``usher.records.VM_FIELDS``; its ``lnm`` is the
LNM it is on (peers before 2026-12 sent it as ``vmm``: still read, never
sent). Every ``callRemote`` is made through ``usher.pbutil.call`` with a timeout.

Controller <-> LNM (mutual TLS; the LNM's name is its certificate's CN)
----------------------------------------------------------------------
The LNM connects to the controller's LNM port and calls, on the root object::

    attach(node_api: Referenceable, hello: dict) -> reporter: Referenceable

``hello`` is ``{"protocol": PROTOCOL_VERSION, "recovery_port": int|None,
"destroy_keeps": True}``: the port of the LNM's recovery listener (None if
it is not listening); the controller persists it with the address the
connection came from. ``destroy_keeps`` (since 2026-12, issue 17; a bool):
the LNM's destroy powers a VM off and keeps it. An LNM whose hello lacks it
(or says false) is older: its destroy removes the VM, and it knows no
delete. The controller refuses destroy on such an LNM (operation_failed:
upgrade it, or delete --force) and sends a delete there as that destroy.
The controller then drives the LNM through ``node_api`` (paper, Table 2)::

    get_node_info() -> dict           name, hostname, uri, driver, cpus,
                                      memory_mib, model, live_migration,
                                      migration_uri, hypervisor_connected
                                      (False: what the node was, while its
                                      hypervisor connection is down)
    get_node_status() -> dict         vms, free_memory_mib (None if unknown),
                                      and the node's figures (see Monitoring)
    list_vms() -> [json chunk]        domain info of every domain on the host
                                      (the inventory taken at attach); plus
                                      "retained": True entries (state
                                      "migrating") for exports kept for the
                                      controller, and "busy": True on VMs a
                                      command of an earlier connection is
                                      still changing (its end is reported)
    get_details(vm name) -> dict      cached record merged with domain info,
                                      plus "lnm" and "cached" (bool); "state"
                                      None when the VM is not on the host
    get_status(vm name) -> dict       the VM's figures (see Monitoring)
    receive([json chunk]) -> int      cache VM records (the controller's view),
                                      returns how many are cached; a record's
                                      "plugin_args" names the args plugins set
                                      (the LNM's plugin_args option applies to
                                      them, request_args to the others)
    start(vm name) -> dict            boot a cached VM (idempotent) -> domain info
    start_many([vm name]) -> [json chunk]
                                      start for each VM (up to 1,024, no
                                      repeats), one answer for all, in the
                                      order asked: {"name", "info"} or
                                      {"name", "error", "kind"} (the
                                      UsherError class name) per VM; the
                                      controller sends batches of up to 32
    op_on(operation, vm name) -> dict|None
                                      a Table 3 operation or delete -> domain
                                      info; None when the VM is gone (after
                                      delete). Since 2026-12 (issue 17)
                                      destroy is a hard power-off that keeps
                                      the domain (shutoff) and delete removes
                                      an inactive one (definition, saved
                                      image), refusing one that runs. An LNM
                                      before that undefines on destroy
                                      (answering None: the controller drops
                                      the record) and refuses delete as an
                                      unknown operation; its hello has no
                                      destroy_keeps (above)
    migrate(vm name, target: dict) -> None
                                      live migration to target["migration_uri"];
                                      fails with MigrationUnsupported if the
                                      driver cannot (or live_migration is off)
    export_image(vm name) -> dict     {"xml": str, "image": [str chunks]}: the
                                      save/restore fallback, base64 text chunks
    import_image(vm name, payload) -> dict
                                      restore an exported VM (cached first with
                                      receive) -> domain info; InvalidRequest,
                                      nothing defined, unless the definition
                                      and the image's are what this LNM would
                                      build for the record (usher.lnm.
                                      received_xml) and the image is at most
                                      the record's memory + import_overhead_mib
    release_export(vm name) -> bool   the exported VM lives elsewhere: forget
                                      the export kept since export_image
    restore_export(vm name) -> dict   put the VM back from the kept export
                                      (idempotent) -> domain info
    ping() -> True

Commands are idempotent: a replayed start finds the VM and boots nothing;
pause/resume/shutdown/hibernate/restore/destroy of a VM already in their
result state answer with the VM as it is; a delete of a VM no longer there
answers None; an import of the same VM (same UUID)
answers it; a replayed export answers the kept one. Each answer is the
command's acknowledgment. An answer that cannot reach the controller (its
connection is gone) is reported instead: an export is put back, an import
undone (the source keeps the export), any other result reported as an
observed change.

Any message counts as a sign of life: each side pings the other (``ping``
above) once it has heard nothing from it for ``ping_interval`` seconds (the
controller waits longer, halfway to its timeout, so that in practice only
the LNM asks), and aborts a connection it has heard nothing on for
``ping_timeout`` seconds; TCP keepalive and TCP_USER_TIMEOUT are set from the
same values.

and the LNM reports through ``reporter``::

    report([json chunk]) -> [json chunk]
        observed changes, each {"name", "state" (None: vanished), "uuid",
        "memory_mib", "vcpus", "metadata"}; the reply holds the controller's
        updated records for the VMs it manages — the acknowledgment of the
        paper: the LNM updates its cached objects from it.
    report_status(node: json object, vms: [json chunk][, kept: [json chunk]])
            -> {"resend": [vm name]}   (True from a controller before 2026-12)
        the latest figures of the node (one JSON-encoded object: banana
        decodes a nested dict item by item, far slower than json) and of
        every VM it samples (a VM neither in ``vms`` nor in ``kept`` has no
        figures any more); sent every ``status_report_interval`` seconds.

        Deltas (since 2026-12, issue 16). ``kept``: JSON chunks of VM names
        (strings of 1 to MAX_NAME characters, no repeats, none also in
        ``vms``; ``vms`` and ``kept`` together at most as many as a report
        may hold VMs, the controller's ``lnm_max_vms``): VMs whose figures,
        ``source``, ``state`` and ``sampled_at`` relative to the node's
        ``sampled_at`` are unchanged since the last report the controller
        acknowledged on this connection. The controller keeps their figures,
        refreshing their age and moving their ``sampled_at`` with the
        node's. Anything else in ``kept`` -> the report refused whole
        (InvalidRequest), nothing changed. Without ``kept`` (an older LNM),
        the report is full, as before.

        The answer: ``{"resend": [names]}``, the VMs of this report whose
        figures the controller does not hold: kept names it could not keep
        (it has no figures of that VM from this LNM, e.g. after its restart,
        or the state does not place the VM on this LNM, whose figures then
        stay untouched) and VMs sent whose figures it did not take (not
        placed there). The LNM sends those in full next time. A report is
        acknowledged when its answer arrives: what it carried (minus
        ``resend``) is then what the controller holds.

        The LNM (usher.lnm.monitor) sends ``kept`` only on a connection whose
        controller answered a dict; the first report after each (re)attach
        is full, as is every ``FULL_REPORT_EVERY``-th (4: once a minute at
        the default interval, so that whatever went wrong heals by itself),
        the one after a report that failed, and any while another is still
        unanswered. A controller that answers True (older) gets full
        reports only.
    ping() -> True
        (the LNM pings with a broker-level heartbeat instead: see
        usher.liveness.HeardBroker)

Monitoring figures (LNM -> controller -> clients and plugins)
------------------------------------------------------------
Each figure is a list of three exponentially damped averages over
``AVERAGE_WINDOWS`` (1, 5 and 15 minutes, like the kernel's load averages),
or None when the hypervisor driver does not report it (never a made-up
number). ``FIGURES`` names them, with their units::

    cpu          percent: of one host CPU for a VM (top's convention: 200 is
                 two CPUs busy), of the whole host for a node (0-100)
    net_rx       network bytes received per second
    net_tx       network bytes sent per second
    disk_read    disk bytes read per second
    disk_write   disk bytes written per second
    memory_used  MiB in use (a VM's resident memory; the host's used memory)

A VM's figures: ``{"name", "cpu", "net_rx", ..., "memory_used",
"sampled_at" (LNM clock), "source"}``; ``source`` is "libvirt", or
"simulated:<profile>" where the LNM's ``simulated_load`` option filled in
what the driver lacks, or None when nothing is available. A node's figures
add ``vms``, ``free_memory_mib``, ``cpus``, ``memory_mib`` and
``sample_interval``. The controller adds ``age`` (seconds since the report
arrived) when it hands figures on.

Recovery announcement (controller -> LNM; mutual TLS, lines)
------------------------------------------------------------
A restarted controller connects to each persisted LNM's recovery port,
presenting its certificate (the LNM checks that it names its configured
controller) and checking the LNM's (it must name that LNM)::

    controller -> LNM   USHER-RECOVERY <PROTOCOL_VERSION> [<term>]
    LNM -> controller   OK attached | OK reconnecting | OK connecting
                        | ERR <reason>

The LNM then dials its own configured controller(s) at once; the
announcement carries no address. ``<term>`` (high availability, below):
decimal digits only, 0 to 2**63 - 1; one below the highest term the LNM has
seen -> ``ERR stale term`` and nothing done; else it becomes the highest
seen and a current link of a lower term is dropped, the LNM dialing around
its configured list at once (``OK reconnecting``). Without a term: as
before (a single controller).

High availability: LNMs and clients (the controller side: next section)
----------------------------------------------------------------------
Configuration of LNMs and clients: ``controller_host`` is a comma-separated
list of ``host[:port]`` (``[v6]:port``; an entry without a port takes
``controller_port``); ``controller_tls_name`` one name for all or one per
entry; each controller's certificate must have role controller and carry
its entry's name. One entry = a single controller, exactly as before
(``usher.controllers``).

Standby: a controller without the lock answers a client's ``login`` and an
LNM's ``attach`` with the error ``Standby`` (code ``standby``: "standby
controller <name>; the active one is <holder>"). LNMs and clients dial the
list in turn: a ``Standby`` refusal, a failed connection or a lost link ->
the next entry at once; the backoff (reconnect_initial_delay growing to
reconnect_max_delay; the client's initial_delay/max_delay) applies only
after a whole round without success. A client's first ``connect`` fails
once a round failed (``Standby`` if every controller was a standby, else
``Unavailable``); later it keeps trying and re-syncs (a fresh subscribe) on
every login, as on any reconnection.

The term gate (controller -> LNM). Right after an LNM attaches, before any
other command, the controller calls on ``node_api``::

    controller_term({"term": int, "controller": str})
                      -> {"accepted": bool, "highest": int}

``term``: an int 0 .. 2**63 - 1 (not a bool); ``controller``: the
controller's name, at most 255 printable characters ("" from a single
controller); exactly these two keys
(anything else: InvalidRequest). Single-controller mode sends term 0. The
LNM remembers the highest term seen (from controller_term and
announcements) in ``<state_dir>/controller_term.json`` (``{"highest":
int}``, written atomically before the term is accepted, so a restarted LNM
still refuses a deposed controller). ``term`` >= highest -> accepted, the
connection has that term; lower -> ``accepted: False`` and the LNM drops
the connection (the controller drops it too). Every other node_api command
on a connection whose term is below the highest seen is refused with
``StaleTerm`` (code ``stale_term``; nothing done) and the connection is
dropped. A connection that never sent controller_term has term 0 (an old
controller): obeyed only while the highest seen is 0.

Controller terms and a standby pair (``[ctrl] ha_database``)
------------------------------------------------------------
Two controllers share one PostgreSQL. Leadership is a session-level
advisory lock (``pg_try_advisory_lock``) on one dedicated connection (TCP
keepalives on both sides); the winner takes a TERM, ``UPDATE
usher_leadership SET term = term + 1, holder = <ha_name>, since = now()
RETURNING term`` (terms only grow). Persisted state is the table
``usher_state(name, data jsonb, term, updated)`` (names ``lnms``,
``affinity``, ``leases``), every write fenced: it commits only while
``usher_leadership.term`` is still the writer's (``SELECT ... FOR SHARE`` in
the same transaction); a deposed leader's write fails and it steps down.

A standby answers ``login`` on its client port and ``attach`` on its LNM
port with the error ``Standby`` (code ``standby``): "standby controller
<name>; the active one is <holder>". Right after an LNM attaches, before
any other command, the controller calls on ``node_api``::

    controller_term({"term": int, "controller": str}) -> {"accepted": bool,
                                                          "highest": int}

One controller sends term 0. Not accepted -> the controller drops the link.
An LNM without the method (``NoSuchMethod``) is accepted with term 0 by a
single controller only; one of a standby pair drops it. With a standby pair
the recovery announcement carries the term as a third token::

    controller -> LNM   USHER-RECOVERY <PROTOCOL_VERSION> <term>

(a single controller sends the two-token form; an LNM accepts both). A
controller that steps down (no successful database check for
``ha_lost_after`` seconds, a newer term in the database, a fenced write)
drops every LNM and client connection at once and stands by again.

Controller <-> client (TLS; user name and password checked by the
controller's authentication chain)
------------------------------------------------------------------
Root object::

    login(username: str, password: str[, observer: Referenceable|None
          [, source: str|None]]) -> perspective
                        (observer: where the controller pushes changes, see
                         below; source: the address of the user behind a
                         gateway, e.g. plusher; it counts only from a
                         gateway's connection, usher.controller.client_login)

Perspective (paper, Table 4, plus session and administration methods)::

    whoami() -> {"user", "admin": bool, "domain"}
    subscribe(clusters: list|None) -> {"seq": int, "chunks": [json chunk]}
                                      the records the session may see (of
                                      those clusters; None: all), then pushes
                                      to the observer
    list(selection, status: bool) -> [json chunk]
                                      with status, each record has "status":
                                      the VM's figures ({} if it has none)
    list_lnm(patterns: list, status: bool) -> [dict]
                                      each {"name", "connected", "vms",
                                      "unmanaged", "hostname", "driver",
                                      "cpus", "memory_mib", "model",
                                      "live_migration", "holds": {kind:
                                      details} (usher.controller.holds: why
                                      it takes no new VMs)}; with status, each has
                                      "status": the node's figures ({} before
                                      any report)
    top(patterns: list, count: int) -> {"lnms": [dict], "vms": [json chunk]}
                                      the LNMs matching patterns (all if
                                      empty) with their figures, and the
                                      ``count`` (0-1000) busiest VMs on them
                                      by the 1-minute CPU average
                                      (list_request plugins filter them as
                                      for list)
    start(vms: list, lnms: list, args: dict|None) -> {"started": [{"name",
                                      "lnm"[, "already": True]}], "failed":
                                      [{"name", "error", "code"}], "notes":
                                      [str], "elapsed": float}
                                      (a VM named that runs already is
                                      started, "already", nothing sent)
                                      (args: at most 32, values of 4,096
                                      characters, 16 KiB in all; VMs: at most
                                      max_request_vms)
    op_on(operation: str, selection, args: dict|None) -> {"operation",
                                      "done": [{"name", "state" (None:
                                      deleted)[, "already": True]}],
                                      "failed": [{"name", "error", "code"}],
                                      "notes": [str]}
                                      (operation: usher.states.OPERATIONS,
                                      Table 3 and, since 2026-12, delete:
                                      of VMs shutoff, hibernated or missing;
                                      args {"force": True} also powers off
                                      and deletes VMs that run, paused or
                                      unknown, else they are refused; force
                                      on another operation, or not a bool,
                                      is InvalidRequest. Through the
                                      delete_request chain like the others.
                                      A VM already in the operation's
                                      result state, usher.states.ALREADY, is
                                      done "already": success, nothing sent)
    migrate(selection, lnms: list, args: dict|None) -> {"migrated": [{"name",
                                      "from", "to"[, "already": True]}],
                                      "failed": [{"name", "error", "code"}],
                                      "notes": [str]}
                                      (already on its target: "already")

Every failed entry's "code" is one of usher.errors.ERROR_CODES (stable:
ush --json and usherweb show it; "rejected" for what a plugin dropped,
"no_capacity" for placement, "wrong_state", "busy", "outcome_unknown" ...);
peers before 2026-12 sent none. A request that fails whole fails with an
UsherError whose class gives its code (``UsherError.code``): NoSuchVM for
an unknown VM or a selection matching none, NoSuchLNM for an unknown LNM,
InvalidRequest for malformed input.
    query(name: str, args_json: str) -> [json chunk]
                                      ask a plugin's registered query
                                      (usher.controller.queries): name of
                                      1-64 characters a-z 0-9 _ . (e.g.
                                      "ipam.ranges"), args a JSON object of
                                      at most 16 KiB; the answer is the
                                      handler's list of items, which decides
                                      what the caller may see. An unknown
                                      query is InvalidRequest; a handler
                                      that fails, OperationFailed
    affinity(cluster: str, rule: str|None) -> {"owner", "cluster", "rule"
                                      (apart, together or None), "vms": int,
                                      "hosts": {lnm: active VMs},
                                      "honoured": bool[, "note"]}
                                      (issue 15) read (rule None) or set the
                                      affinity rule of one of the caller's
                                      virtual clusters ("none" removes it);
                                      administrators may name
                                      "owner/cluster". Placement and the
                                      rebalancer honour it
                                      (usher.controller.affinity); a start's
                                      arg affinity=apart|together sets it too

Administrators only (others get PermissionDenied)::

    plugins() -> {"available": [name], "about": {name: first sentence of its
                                      docstring}, "registered": [{"plugin",
                                      "event", "order", "config", "timeout"
                                      [, "interval" (timer)]}] in calling order}
    register_plugin(name: str, event: str, config_file: str|None,
                    order: int|None) -> as plugins(), after registering
                                      (config_file: an absolute path on the
                                      controller's host)
    unregister_plugin(name: str, event: str|None) -> as plugins(), after
                                      taking the plugin off that event's
                                      chain (None: off every chain)
    forget_lnm(name: str) -> {"lnm": name, "forgotten": [vm name]}
                                      retire a disconnected LNM and the VMs
                                      last known on it (also from the
                                      persisted list of LNMs)
    maintenance(lnm: str, on: bool, reason: str|None, evacuate: bool,
                concurrency: int|None) -> as evacuation(lnm)
                                      put an LNM into maintenance (hold
                                      "maintenance": no new VMs, the
                                      rebalancer leaves it alone) and, with
                                      evacuate, live-migrate every VM off it,
                                      concurrency (1-64, default [ctrl]
                                      evacuation_concurrency) at a time; on
                                      false: out of maintenance (an evacuation
                                      under way starts no more moves)
    evacuation(lnm: str) -> {"lnm", "maintenance": bool, "reason", "by",
                             "since", "evacuating": bool, "done": bool,
                             "total": int, "moved": [{"name", "to"}],
                             "failed": [{"name", "error"}], "running":
                             [name], "waiting": int, "concurrency": int}
                                      the progress of its last evacuation
                                      (resumed after a controller restart)
    confirm_fenced(lnm: str, evidence: str|None) -> {"lnm", "fenced": {"evidence",
                                      "by", "since", "restarted": [vm]}}
                                      the administrator's word that the host
                                      of a disconnected LNM is off: its lost
                                      VMs may be restarted elsewhere (issue
                                      15, part B; a connected LNM is
                                      InvalidRequest)

A selection is None (every VM), a list of names and ranges, or a dict with
"names", "regex", "clusters", "everything" and "lnms" (LNM names, ranges,
/regex/ or ~regex: only the VMs on those LNMs, or alone every VM the caller
may see on them; an LNM name the controller does not know is
NoSuchLNM; sent only when not empty). One request (its selection
and its LNM list together) may name at most max_selection_names names,
ranges expanded, and carry at most max_selection_patterns ranges and
regular expressions (RE2 syntax, 256 characters at most); past that it is
refused whole (InvalidRequest). list and top show an ordinary user their
own VMs only, unless the controller's user_visibility is "all"; another
user's "args" never reach an ordinary user; pushes carry only one's own.

Observer (the client's callback object; the controller calls only these)::

    vm_changes(seq: int, changed: [json chunk], removed: [str])
                        (a one-way message, PB's pbanswer off: the client
                        sends no answer; a push it could not take shows as
                        a gap in seq, and it subscribes again; the changes a
                        request made are pushed before its answer is sent)
    notice(kind: str, message: str) -> None
                        (issue 15: news for this user from the controller or a
                        plugin, e.g. kind "lease"; kind <= 32 characters of
                        a-z0-9_.-, message one line <= 1,000 characters; at
                        most one call in flight per session and 32 waiting,
                        the oldest dropped: usher.controller.notices)
"""

PROTOCOL_VERSION = 1

# Monitoring: the averaging windows in seconds and the figures reported.
AVERAGE_WINDOWS = (60.0, 300.0, 900.0)
FIGURES = ("cpu", "net_rx", "net_tx", "disk_read", "disk_write", "memory_used")

# The most names one request may carry, and the longest string field; PB
# itself allows more, but nothing legitimate needs it.
MAX_REQUEST_NAMES = 100_000
MAX_FIELD = 4096

# Changes in one LNM report at most (the controller refuses more than its
# ``lnm_max_report_changes``, which may not be set below this).
REPORT_BATCH = 512

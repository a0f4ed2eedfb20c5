"""The wire protocols between Usher's processes, in one place.

All links are Perspective Broker over TLS. Bulk VM data travels as JSON
chunks (``usher.records``); everything else as small dicts of primitives.
Every ``callRemote`` is made through ``usher.pbutil.call`` with a timeout.

Controller <-> LNM (mutual TLS; the LNM's name is its certificate's CN)
----------------------------------------------------------------------
The LNM connects to the controller's LNM port and calls, on the root object::

    attach(node_api: Referenceable, hello: dict) -> reporter: Referenceable

``hello`` is ``{"protocol": PROTOCOL_VERSION, "recovery_port": int|None}``.
The controller then drives the LNM through ``node_api`` (paper, Table 2)::

    get_node_info() -> dict           hostname, uri, driver, cpus, memory_mib,
                                      model, live_migration, migration_uri
    get_node_status() -> dict         vms, free_memory_mib (None if unknown)
    list_vms() -> [json chunk]        domain info of every domain on the host
    get_details(vm name) -> dict      cached record merged with domain info
    get_status(vm name) -> dict       resource usage (monitoring; may be {})
    receive([json chunk]) -> int      cache VM records (the controller's view),
                                      returns how many are cached
    start(vm name) -> dict            boot a cached VM (idempotent) -> domain info
    op_on(operation, vm name) -> dict|None
                                      Table 3 operation -> domain info (None
                                      after destroy)
    migrate(vm name, target: dict) -> None
                                      live migration to target["migration_uri"];
                                      fails with MigrationUnsupported if the
                                      driver cannot
    export_image(vm name) -> dict     {"xml": str, "image": [str chunks]}: the
                                      save/restore fallback, base64 text chunks
    import_image(vm name, payload) -> dict
                                      restore an exported VM (cached first with
                                      receive) -> domain info
    ping() -> True

and the LNM reports through ``reporter``::

    report([json chunk]) -> [json chunk]
        observed changes, each {"name", "state" (None: vanished), "uuid",
        "memory_mib", "vcpus", "metadata"}; the reply holds the controller's
        updated records for the VMs it manages — the acknowledgment of the
        paper: the LNM updates its cached objects from it.
    ping() -> True

Controller <-> client (TLS; user name and password checked by the
controller's authentication chain)
------------------------------------------------------------------
Root object::

    login(username: str, password: str, observer: Referenceable) -> perspective

Perspective (paper, Table 4, plus session methods)::

    subscribe(clusters: list|None) -> {"seq": int, "chunks": [json chunk]}
    list(selection, status: bool) -> [json chunk]
    list_lnm(patterns: list, status: bool) -> [dict]
    start(vms: list, lnms: list, args: dict) -> result dict
    op_on(operation, selection, args: dict) -> result dict
    migrate(selection, lnms: list, args: dict) -> result dict
    whoami() -> {"user", "admin", "domain"}

Observer (the client's callback object)::

    vm_changes(seq: int, changed: [json chunk], removed: [str]) -> None
    notice(kind: str, message: str) -> None
"""

PROTOCOL_VERSION = 1

# The most names one request may carry, and the longest string field; PB
# itself allows more, but nothing legitimate needs it.
MAX_REQUEST_NAMES = 100_000
MAX_FIELD = 4096

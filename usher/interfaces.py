"""The seams of Usher, as zope.interface interfaces.

- ``IVMM``: one hypervisor on one host, driven by an LNM (libvirt is the
  shipped implementation, for any libvirt URI).
- ``ILNMHandle``: the controller's handle on one attached LNM (its Table 2
  node API); ``usher.controller.lnm_link.RemoteLNM`` over PB.
- ``IPlugin``: a policy or integration module on one or more event chains.
- ``IAuthModule``: one link of the controller's authentication chain.

Every method that may block returns a Deferred (or is a coroutine function
where stated); nothing here blocks the reactor.
"""

from zope.interface import Attribute, Interface


class IVMM(Interface):
    """A virtual machine monitor on one host.

    Domain dictionaries ("domain info") have the keys ``name``, ``uuid``,
    ``state`` (one of ``usher.states``), ``memory_mib``, ``vcpus`` and
    ``metadata`` (a dict with at least ``owner`` and ``cluster`` when the
    domain was created by Usher; empty for domains created by others).

    Every method returns a Deferred. Errors: ``usher.errors.NoSuchVM`` when
    the domain does not exist, ``usher.errors.OperationFailed`` when the
    hypervisor refuses, ``usher.errors.MigrationUnsupported`` from
    ``migrate`` where the driver cannot migrate.
    """

    uri = Attribute("The libvirt (or other) URI this VMM is connected to.")

    def connect():
        """Open the hypervisor connection (and its event stream, if any)."""

    def close():
        """Close the connection; pending calls fail."""

    def node_info():
        """-> dict: hostname, uri, driver, cpus, memory_mib, model,
        live_migration (bool: can this driver live-migrate)."""

    def node_status():
        """-> dict: vms (count of running domains), free_memory_mib (int or
        None when the driver does not report it)."""

    def list_domains():
        """-> list of domain info for every domain on the host (running,
        paused, saved or defined-but-off)."""

    def domain_info(name):
        """-> domain info for one domain."""

    def create(spec):
        """Define and boot a domain. ``spec`` has name, uuid, memory_mib,
        vcpus, owner, cluster and args (a dict of extra request arguments).
        Idempotent: if a domain of that name already exists and runs, return
        its info without creating a second one; if it exists shut off, boot
        it. -> domain info."""

    def operate(operation, name):
        """Apply one Table 3 operation (pause, resume, shutdown, reboot,
        hibernate, restore, destroy, cycle, delete). ``destroy`` powers the
        domain off hard and keeps it (a transient domain is gone then);
        ``delete`` removes an inactive domain's definition and any saved
        image, and refuses a running one. -> domain info, or None when the
        domain is gone (after delete)."""

    def migrate(name, target_uri):
        """Live-migrate to the hypervisor at target_uri. -> None."""

    def export_image(name):
        """For drivers that cannot migrate: save the domain's memory image
        and definition and remove it from this host. -> {"xml": str,
        "image": bytes or None (a shut-off VM has none), "state": the state
        to restore}."""

    def import_image(spec, payload):
        """Counterpart of export_image on the target host, given its whole
        result. -> domain info."""

    def subscribe(callback):
        """Call callback(name, state) on the reactor thread for every
        lifecycle event the driver reports (state may be None when the
        domain disappeared). Drivers without events never call it."""

    # Optional: ``watch_connection(callback)`` -- callback(connected: bool) on
    # the reactor thread when the hypervisor connection is lost (False; the
    # VMM then reconnects with backoff and its calls fail with Unavailable
    # meanwhile) and when it is back (True). The LNM reports its VMs
    # "unknown" in between. LibvirtVMM has it.


class ILNMHandle(Interface):
    """The controller's handle on one attached LNM: its node API (paper,
    Table 2) as coroutine methods, each with a timeout.

    Every method is a coroutine function unless stated. Answers have been
    checked (``usher.controller.lnm_input``): an LNM may be compromised.
    Errors: an ``usher.errors.UsherError`` the LNM reported (``NoSuchVM``,
    ``OperationFailed``, ...), or ``usher.errors.LinkFailure`` when the call
    failed on the way -- its ``sent`` tells "never sent, nothing happened"
    from "sent, outcome unknown".
    """

    def get_node_info():
        """-> dict: the host's hostname, uri, driver, cpus, memory_mib,
        model, live_migration."""

    def get_node_status():
        """-> dict: vms, free_memory_mib and the LNM's figures."""

    def list_vms():
        """-> list of domain info: the LNM's whole inventory."""

    def get_details(name):
        """-> domain info for one VM."""

    def get_status(name):
        """-> the VM's state on the LNM."""

    def receive(records):
        """Hand the LNM the records (``LNM_FIELDS`` only) of VMs it is to
        start or take in. -> None."""

    def start(name):
        """Start one received VM. -> domain info (may be empty)."""

    def start_many(names):
        """Start received VMs. -> [(name, domain info or UsherError)] in
        the order asked."""

    def op_on(operation, name):
        """Apply one Table 3 operation. -> domain info, or None (delete)."""

    def migrate(name, target):
        """Live-migrate to the LNM described by ``target`` (name, uri)."""

    def export_image(name):
        """Save the VM for a cold move; the LNM keeps the export until
        released or restored. -> the payload for ``import_image``."""

    def import_image(name, payload):
        """Take in a VM exported by another LNM. -> domain info."""

    def release_export(name):
        """Drop a kept export: the VM runs elsewhere now."""

    def restore_export(name):
        """Bring a kept export back to life here. -> domain info or None."""

    def ping():
        """Not a coroutine: -> Deferred firing when the LNM answered, failing
        when it did not in time (used by the liveness monitor)."""

    def disconnect():
        """Not a coroutine: close the link politely."""

    def abort():
        """Not a coroutine: drop the link at once (a cut link never
        finishes a polite close)."""


class IPlugin(Interface):
    """A plugin instance registered on one or more event chains.

    A plugin module exposes a class ``Plugin`` taking ``(config, api)``:
    ``config`` is its parsed configuration (a dict, see ``CONFIG_SPEC``),
    ``api`` the controller's plugin API
    (``usher.controller.plugin_api.PluginAPI``, also ``event.api``).
    Finding, loading and ordering plugins: ``usher.controller.plugins``.

    Plugins run on the reactor thread: while ``entry_point`` computes, the
    controller serves nobody. Blocking work (a database, DNS, files, a
    subprocess) goes through ``api.run_blocking(function, *args,
    **kwargs)``: ``function`` runs in the controller's plugin thread pool
    and the returned Deferred fires, on the reactor, with its result::

        async def entry_point(self, event):
            rows = await event.api.run_blocking(self.db.fetch, event.vm["name"])

    ``function`` must not touch the controller's state or Twisted; pass it
    what it needs. A call that holds the reactor longer than ``[ctrl]
    plugin_hold_warning`` seconds is logged as a warning naming the plugin.
    """

    name = Attribute("The plugin's name (its module name).")
    order = Attribute("Position on event chains; lower runs first.")

    def entry_point(event):
        """Called when an event this plugin is registered for fires.

        May return None, a Deferred, or a coroutine. For request events
        the plugin approves (does nothing), modifies ``event.request``, or
        calls ``event.request.reject(reason)``."""


class IAuthModule(Interface):
    """One module in the controller's authentication chain."""

    name = Attribute("Short name used in the configuration (e.g. 'local').")

    def authenticate(username, password):
        """-> Deferred firing True (accepted), False (rejected: try the next
        module) . Raising means the module is broken; the chain logs it and
        goes on."""

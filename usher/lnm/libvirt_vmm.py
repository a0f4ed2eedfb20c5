"""``IVMM`` over libvirt: any libvirt URI, the test driver included.

Every libvirt call runs in an injected Twisted thread pool, on the one shared
(thread-safe) connection of ``usher.lnm.libvirt_connection``, which also
brings the lifecycle events and reconnects; results and errors come back as
Deferreds on the reactor thread. Each operation is written once: the blocking
function a pool thread runs, made an IVMM method by ``pool_call`` with its
argument checks. libvirt errors become Usher errors: ``NoSuchVM`` for a
missing domain, ``OperationFailed`` carrying libvirt's message otherwise,
``MigrationUnsupported`` where the driver cannot migrate.

Beside it: ``libvirt_domains`` (blocking building blocks on domains),
``libvirt_import`` (what a VM from another host must pass),
``libvirt_stats`` (the statistics the monitor samples). What stays here
(about 600 lines) is one job: the blocking function behind each IVMM
operation, next to its argument checks.

Files under ``state_dir``:

- ``images/<name>.save``: a hibernated VM's memory image. A shut-off domain
  that has one is reported ``hibernated``; ``restore`` boots from it and
  deletes it.
- ``consoles/<name>.log``: serial console of VMs built from the QEMU template.
"""

import functools
import inspect
import os
import uuid as uuidlib
from contextlib import suppress

import libvirt
from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from usher import states
from usher.errors import ConfigError, InvalidRequest, MigrationUnsupported
from usher.interfaces import IVMM
from usher.lnm import domain_xml, libvirt_domains, received_xml, testhost
from usher.lnm.libvirt_connection import HypervisorConnection, error_code
from usher.lnm.libvirt_domains import NameLocks, wait_until
from usher.lnm.libvirt_import import VMM_STATES, ImportChecks, import_arguments
from usher.lnm.libvirt_stats import (DOMAIN_STATES, DRIVERS_WITH_FIXED_STATS,
                                     StatisticsSampler, host_memory_kib, read_each)

DEFAULT_SHUTDOWN_TIMEOUT = 60.0

_MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                  | libvirt.VIR_MIGRATE_PERSIST_DEST
                  | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)

_DRIVERS_WITHOUT_MIGRATION = frozenset(("test",))


def pool_call(what, *, check=None, soon=False):
    """An IVMM method written once, as the blocking ``fn(self, conn, *args)``
    that a pool thread runs on the hypervisor connection
    (``HypervisorConnection.run``, or ``run_soon`` when ``soon``: libvirt
    errors translated). The method takes fn's arguments after ``conn`` and
    returns a Deferred.

    ``check(vmm, *args, **kwargs)``, if given, takes the method's arguments
    instead and runs first, on the reactor thread: it raises InvalidRequest
    for bad ones and returns fn's arguments (a tuple), or None to pass them
    as given. ``what`` names the call in errors: a format string over fn's
    arguments by name; fn's argument ``name`` is the VM whose absence is
    ``NoSuchVM``. Every failure, a bad argument included, is a failed
    Deferred; only a call that does not fit the signature raises TypeError.
    """
    def decorate(fn):
        signature = inspect.signature(fn)
        own = list(signature.parameters.values())
        given = list(inspect.signature(check).parameters.values())[1:] if check else own[2:]
        public = signature.replace(parameters=own[:1] + given)   # self, the arguments

        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            public.bind(self, *args, **kwargs)
            try:
                if check is not None:
                    checked = check(self, *args, **kwargs)
                    if checked is not None:
                        args, kwargs = checked, {}
                bound = signature.bind(self, None, *args, **kwargs)
                bound.apply_defaults()
                arguments = dict(list(bound.arguments.items())[2:])
                run = self.hypervisor.run_soon if soon else self.hypervisor.run
                return run(what.format(**arguments), arguments.get("name"),
                           functools.partial(fn, self, **bound.kwargs), *bound.args[2:])
            except Exception:
                return fail()

        del method.__wrapped__          # its signature is the public one, not fn's
        method.__signature__ = public
        return method

    return decorate


# --- argument checks (reactor thread) ----------------------------------------------

def _checked_name(_vmm, name):
    domain_xml.check_name(name)


def _checked_create(_vmm, spec):
    uuid_given = isinstance(spec, dict) and spec.get("uuid") is not None
    spec = domain_xml.normalize_spec(spec)
    return spec["name"], spec, uuid_given


def _checked_operation(vmm, operation, name, *, shutdown_timeout=None):
    if shutdown_timeout is None:
        shutdown_timeout = vmm.shutdown_timeout
    if operation not in states.OPERATIONS:
        raise InvalidRequest(f"unknown operation {operation!r}; the operations "
                             f"are {', '.join(states.OPERATIONS)}")
    domain_xml.check_name(name)
    if (isinstance(shutdown_timeout, bool)
            or not isinstance(shutdown_timeout, (int, float))
            or shutdown_timeout < 0):
        raise InvalidRequest(f"shutdown_timeout must be a number of seconds >= 0, "
                             f"not {shutdown_timeout!r}")
    return operation, name, shutdown_timeout


def _checked_migration(_vmm, name, target_uri):
    domain_xml.check_name(name)
    if not isinstance(target_uri, str) or not target_uri:
        raise InvalidRequest(f"the migration target must be a libvirt URI, "
                             f"not {target_uri!r}")


def _checked_import(vmm, spec, payload):
    return import_arguments(spec, payload, overhead_mib=vmm.import_overhead_mib)


def _either(allowed):
    return " or ".join(s for s in VMM_STATES if s in allowed)


@implementer(IVMM)
class LibvirtVMM:
    """One libvirt hypervisor, driven from the LNM.

    ``domain_template``: path of a site domain XML template (see
    ``usher.lnm.domain_xml``); None for the driver's built-in one.
    ``template_defaults``: template variables (kernel, initrd, cmdline, disk,
    network, ...) that request args override where ``arg_policy``
    (``domain_xml.ArgPolicy``; None: args set no template variable) lets them.
    ``events``: use libvirt lifecycle events when the driver has them.
    ``import_overhead_mib``: how much larger than a VM's memory the memory
    image of an imported VM may be (``received_xml.image_limit``).
    ``live_migration``: False: never live-migrate (libvirt hands the target
    the source's definition unchecked); VMs move by export/import, whose
    definitions the target checks.
    ``reconnect_initial_delay``/``reconnect_max_delay``: when the connection
    to the hypervisor is lost (libvirtd restarted), reconnect after this
    delay, doubling (with jitter) up to the maximum; ``watch_connection``
    callbacks hear of the loss and the return. ``clock`` schedules the
    attempts (default: ``reactor``).
    """

    log = Logger()

    def __init__(self, uri, *, reactor, pool, state_dir, domain_template=None,
                 events=True, template_defaults=None, reconnect_initial_delay=1.0,
                 reconnect_max_delay=30.0, clock=None, arg_policy=None,
                 import_overhead_mib=received_xml.DEFAULT_IMPORT_OVERHEAD_MIB,
                 live_migration=True, shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT):
        if not isinstance(uri, str) or not uri:
            raise ConfigError(f"the hypervisor URI must be a non-empty string, not {uri!r}")
        defaults = dict(template_defaults or {})
        for key, value in defaults.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError(f"template default {key!r} must map a name to a "
                                  f"string, not {value!r}")
        self.uri = uri
        self.state_dir = os.path.abspath(state_dir)
        self._reactor = reactor
        self._pool = pool
        self._template_path = domain_template
        self._template_defaults = defaults
        self._arg_policy = (arg_policy if arg_policy is not None
                            else domain_xml.ArgPolicy(state_dir=self.state_dir))
        self.import_overhead_mib = import_overhead_mib
        self.live_migration = bool(live_migration)
        # Seconds a guest has to act on shutdown's ACPI request before it is
        # powered off hard (the LNM's shutdown_timeout option).
        self.shutdown_timeout = shutdown_timeout
        self.hypervisor = HypervisorConnection(
            uri, reactor=reactor, pool=pool, clock=clock if clock is not None else reactor,
            prepare=self._prepare, events=events,
            reconnect_initial_delay=reconnect_initial_delay,
            reconnect_max_delay=reconnect_max_delay)
        self._import_checks = ImportChecks(state_dir=self.state_dir, defaults=defaults,
                                           policy=self._arg_policy)
        self._locks = NameLocks()
        self._sampler = StatisticsSampler()
        # Seam: how a shutdown waits for the guest (tests replace it).
        self._wait_until = wait_until

    # --- plumbing -------------------------------------------------------------

    @property
    def driver(self):
        """The connected driver's name in lower case ("test", "qemu"), or None."""
        return self.hypervisor.driver

    @property
    def events_supported(self):
        """True once connected with a lifecycle event stream."""
        return self.hypervisor.events_supported

    @property
    def _template(self):
        # The site template, read again at every connection (see _prepare).
        return self.hypervisor.prepared

    def image_path(self, name):
        return os.path.join(self.state_dir, "images", f"{name}.save")

    def _scratch_path(self, name, purpose):
        return os.path.join(self.state_dir, "images",
                            f".{name}.{purpose}-{uuidlib.uuid4().hex}")

    def _log_soon(self, level, fmt, **fields):
        # Log observers expect the reactor thread.
        self._reactor.callFromThread(lambda: getattr(self.log, level)(fmt, **fields))

    # --- connection -----------------------------------------------------------

    @property
    def connected(self):
        return self.hypervisor.conn is not None

    @property
    def libvirt_connection(self):
        """The libvirt connection in use (None while disconnected): for
        acting on the hypervisor behind Usher's back, as a benchmark or an
        administrator's virsh would. Blocking: use it from a thread."""
        return self.hypervisor.conn

    def watch_connection(self, callback):
        """callback(connected: bool) on the reactor thread when the
        hypervisor connection is lost (False) and when it is back (True)."""
        self.hypervisor.watch(callback)

    def connect(self):
        return self.hypervisor.connect()

    def close(self):
        return self.hypervisor.close()

    def _prepare(self, conn, driver):
        """Each new connection, in the pool: the state directories, the site
        template (-> it, or None for the built-in one) and a driver it can
        build domains for."""
        for sub in ("images", "consoles"):
            os.makedirs(os.path.join(self.state_dir, sub), exist_ok=True)
        template = (domain_xml.DomainTemplate.from_file(self._template_path)
                    if self._template_path else None)
        if template is None and driver not in domain_xml.BUILTIN_DRIVERS:
            raise ConfigError(f"no built-in domain template for the {driver!r} "
                              f"driver at {self.uri}: configure a domain template")
        return template

    def subscribe(self, callback):
        self.hypervisor.subscribe(callback)
        return succeed(None)

    def unsubscribe(self, callback):
        self.hypervisor.unsubscribe(callback)
        return succeed(None)

    # --- domain info (pool threads) -------------------------------------------

    def _state_of(self, dom, code=None):
        if code is None:
            code = dom.state()[0]
        state = DOMAIN_STATES.get(code, states.UNKNOWN)
        if code == libvirt.VIR_DOMAIN_SHUTOFF and os.path.exists(self.image_path(dom.name())):
            return states.HIBERNATED
        return state

    # Seams: how a domain's metadata is read, and a guest asked to shut down.
    _metadata_of = staticmethod(libvirt_domains.read_metadata)
    _request_shutdown = staticmethod(libvirt_domains.request_shutdown)

    def _info_of(self, dom):
        code, max_memory_kib, _memory_kib, vcpus, _cpu_time = dom.info()
        name, uuid = dom.name(), dom.UUIDString()
        return {
            "name": name,
            "uuid": uuid,
            "state": self._state_of(dom, code),
            "memory_mib": max_memory_kib // 1024,
            "vcpus": vcpus,
            "metadata": self._remembered_metadata(dom, name, uuid),
        }

    def _remembered_metadata(self, dom, name, uuid):
        """``_metadata_of``, read once per definition where events say when a
        domain is (re)defined or its metadata changes: a scan of a host reads
        no domain's metadata (a libvirt call and an XML parse each) again and
        again."""
        if not self.hypervisor.metadata_events:
            return self._metadata_of(dom)
        known = self.hypervisor.metadata.get(name)
        if known is not None and known[0] == uuid:
            return dict(known[1])
        metadata = self._metadata_of(dom)
        self.hypervisor.metadata[name] = (uuid, dict(metadata))
        return metadata

    def _created_info(self, dom, name, xml):
        """``_info_of`` a domain just defined from ``xml`` and booted: its
        name, UUID and metadata are what the definition says, so only its
        state and size are asked (each libvirt call hands the interpreter
        lock to other threads and waits to get it back)."""
        code, max_memory_kib, _memory_kib, vcpus, _cpu_time = dom.info()
        uuid, metadata = libvirt_domains.defined_identity(xml)
        uuid = uuid or dom.UUIDString()
        if self.hypervisor.metadata_events:
            self.hypervisor.metadata[name] = (uuid, dict(metadata))
        return {"name": name, "uuid": uuid, "state": self._state_of(dom, code),
                "memory_mib": max_memory_kib // 1024, "vcpus": vcpus,
                "metadata": metadata}

    def _info_or_none(self, conn, name):
        try:
            return self._info_of(conn.lookupByName(name))
        except libvirt.libvirtError as e:
            if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _remove_image(self, name):
        with suppress(FileNotFoundError):
            os.unlink(self.image_path(name))
    # --- node -----------------------------------------------------------------

    @pool_call("node info")
    def node_info(self, conn):
        model, memory_mib, cpus = conn.getInfo()[:3]
        driver = conn.getType()
        simulated = testhost.read_test_host(self.uri) if driver.lower() == "test" else None
        if not simulated:
            memory_mib = host_memory_kib(conn)[0] // 1024
        return {
            "hostname": simulated["hostname"] if simulated else conn.getHostname(),
            "uri": conn.getURI(),
            "driver": driver,
            "cpus": cpus,
            "memory_mib": memory_mib,
            "model": model,
            "live_migration": (self.live_migration
                               and driver.lower() not in _DRIVERS_WITHOUT_MIGRATION),
        }

    @pool_call("node status")
    def node_status(self, conn):
        free_mib = None
        # The test driver's figure is 0 (custom node files) or KiB mislabelled
        # as bytes (test:///default): never a real free-memory value.
        if conn.getType().lower() != "test":
            free_kib = host_memory_kib(conn)[1]
            free_mib = free_kib // 1024 if free_kib else None
        return {"vms": conn.numOfDomains(), "free_memory_mib": free_mib}

    # --- statistics (monitoring) -----------------------------------------------

    @property
    def fixed_stats(self):
        """True when the connected driver's statistics are fixed values (the
        test driver): every counter of domain_stats/node_stats is then None."""
        return self.driver in DRIVERS_WITH_FIXED_STATS

    @pool_call("domain statistics")
    def domain_stats(self, conn):
        """-> Deferred list of raw samples, one per active (running or paused)
        domain: ``name``, ``uuid``, ``state``, ``vcpus``, ``memory_kib`` (its
        current allocation), the cumulative counters ``cpu_time_ns``,
        ``net_rx_bytes``, ``net_tx_bytes``, ``disk_read_bytes``,
        ``disk_write_bytes`` and the gauge ``memory_used_kib``. A counter the
        driver does not report is None. One bulk call
        (``getAllDomainStats``) where the driver has it, else per-domain
        calls."""
        return self._sampler.domain_samples(conn, fixed=self.fixed_stats)

    @pool_call("node statistics")
    def node_stats(self, conn):
        """-> Deferred dict: ``cpus``, ``memory_kib`` (the host's size),
        ``vms`` (active domains), the cumulative counters ``cpu_busy_ns`` and
        ``cpu_total_ns``, and ``memory_used_kib``/``memory_free_kib``; None
        for what the driver does not report."""
        return self._sampler.node_sample(conn, fixed=self.fixed_stats)

    # --- domains --------------------------------------------------------------

    @pool_call("listing domains")
    def list_domains(self, conn):
        return read_each(conn.listAllDomains(0), self._info_of)

    @pool_call("info of {name!r}", check=_checked_name)
    def domain_info(self, conn, name):
        return self._info_of(conn.lookupByName(name))

    @pool_call("create {name!r}", check=_checked_create, soon=True)
    def create(self, conn, name, spec, uuid_given):
        with self._locks.hold(name):
            existing = libvirt_domains.lookup_or_none(conn, name)
            if existing is not None:
                if uuid_given and existing.UUIDString() != spec["uuid"]:
                    self._log_soon("warn", "create {vm}: a domain of that name already "
                                   "exists with UUID {existing}, not {wanted}; using it",
                                   vm=name, existing=existing.UUIDString(),
                                   wanted=spec["uuid"])
                state = self._state_of(existing)
                if state == states.HIBERNATED:
                    libvirt_domains.restore(conn, name, self.image_path(name), paused=False)
                    self._remove_image(name)
                    return self._info_of(conn.lookupByName(name))
                if state == states.SHUTOFF:
                    existing.create()
                return self._info_of(existing)
            xml = domain_xml.build_domain_xml(
                spec, driver=self.driver, state_dir=self.state_dir,
                template=self._template, defaults=self._template_defaults,
                policy=self._arg_policy)
            # An image left by a VM of this name that no longer exists would
            # make the new one look hibernated once it is shut off.
            self._remove_image(name)
            dom = conn.defineXML(xml)
            try:
                dom.create()
            except libvirt.libvirtError:
                libvirt_domains.undefine_quietly(dom)
                raise
            return self._created_info(dom, name, xml)

    # --- Table 3 operations -----------------------------------------------------

    @pool_call("{operation} {name!r}", check=_checked_operation)
    def operate(self, conn, operation, name, shutdown_timeout):
        with self._locks.hold(name):
            dom = conn.lookupByName(name)
            state = self._state_of(dom)
            allowed = states.OPERATION_PRECONDITIONS[operation]
            if state not in allowed:
                raise InvalidRequest(f"cannot {operation} VM {name!r}: it is {state}, "
                                     f"and {operation} needs it {_either(allowed)}")
            if operation == "pause":
                dom.suspend()
            elif operation == "resume":
                dom.resume()
            elif operation == "shutdown":
                self._shutdown_sync(dom, name, state, shutdown_timeout)
            elif operation == "reboot":
                dom.reboot(0)
            elif operation == "hibernate":
                self._hibernate_sync(dom, name)
            elif operation == "restore":
                libvirt_domains.restore(conn, name, self.image_path(name), paused=False)
                self._remove_image(name)
            elif operation == "destroy":
                # Table 3's hard shutdown: off at once, the definition kept
                # (a transient domain has none: it is gone).
                if state != states.SHUTOFF:
                    dom.destroy()
            elif operation == "delete":
                self._delete_sync(dom, name)
                return None
            elif operation == "cycle":
                if not dom.isPersistent():
                    raise InvalidRequest(f"cannot cycle VM {name!r}: it has no "
                                         "persistent definition to boot again")
                if state != states.SHUTOFF:
                    dom.destroy()
                dom.create()
            return self._info_or_none(conn, name)

    def _shutdown_sync(self, dom, name, state, timeout):
        def stopped():
            try:
                return not dom.isActive()
            except libvirt.libvirtError as e:
                if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN:  # transient: gone
                    return True
                raise

        if state == states.PAUSED:
            dom.resume()  # a paused guest cannot see the power button
        self._request_shutdown(dom)
        if self._wait_until(stopped, timeout):
            return
        if not stopped():
            self._log_soon("warn", "VM {vm} did not shut down within {timeout} s; "
                           "destroying it", vm=name, timeout=timeout)
            dom.destroy()

    def _hibernate_sync(self, dom, name):
        if not dom.isPersistent():
            raise InvalidRequest(f"cannot hibernate VM {name!r}: it has no "
                                 "persistent definition to restore into")
        # Save beside the final name and rename: a failed save must not leave
        # a partial image that would make the VM look hibernated.
        partial = self._scratch_path(name, "saving")
        try:
            dom.save(partial)
            os.replace(partial, self.image_path(name))
        finally:
            with suppress(FileNotFoundError):
                os.unlink(partial)

    def _delete_sync(self, dom, name):
        # Only an inactive domain (the precondition): a running one is
        # destroyed first, by the controller's choice (delete --force).
        if dom.isPersistent():
            libvirt_domains.undefine(dom)
        self._remove_image(name)

    # --- moving VMs -------------------------------------------------------------

    @pool_call("migrate {name!r} to {target_uri}", check=_checked_migration)
    def migrate(self, conn, name, target_uri):
        with self._locks.hold(name):
            dom = conn.lookupByName(name)
            state = self._state_of(dom)
            if state not in (states.RUN, states.PAUSED):
                raise InvalidRequest(f"cannot live-migrate VM {name!r}: it is {state}")
            if not self.live_migration:
                raise MigrationUnsupported(
                    "live migration is turned off on this LNM (live_migration = False): "
                    "move VMs with export_image/import_image")
            if self.driver in _DRIVERS_WITHOUT_MIGRATION:
                raise MigrationUnsupported(
                    f"the {self.driver} driver at {self.uri} cannot migrate VMs; "
                    "move them with export_image/import_image")
            try:
                dom.migrateToURI3(target_uri, {}, _MIGRATE_FLAGS)
            except libvirt.libvirtError as e:
                if error_code(e) == libvirt.VIR_ERR_NO_SUPPORT:
                    raise MigrationUnsupported(
                        f"{self.uri} cannot migrate {name!r}: "
                        f"{e.get_error_message()}") from None
                raise
            return None

    @pool_call("export {name!r}", check=_checked_name)
    def export_image(self, conn, name):
        """-> {"xml": definition, "image": bytes or None, "state": state}.

        Takes the VM off this host: a running or paused VM is saved, a
        hibernated one gives its image, a shut-off one only its definition.
        """
        with self._locks.hold(name):
            dom = conn.lookupByName(name)
            state = self._state_of(dom)
            if not dom.isPersistent():
                raise InvalidRequest(f"cannot export VM {name!r}: it has no "
                                     "persistent definition")
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            image = None
            if state in (states.RUN, states.PAUSED):
                scratch = self._scratch_path(name, "export")
                try:
                    dom.save(scratch)
                    with open(scratch, "rb") as f:
                        image = f.read()
                    self._undefine_or_put_back(conn, dom, name, scratch, state)
                finally:
                    with suppress(FileNotFoundError):
                        os.unlink(scratch)
            elif state == states.HIBERNATED:
                with open(self.image_path(name), "rb") as f:
                    image = f.read()
                libvirt_domains.undefine(dom)
                self._remove_image(name)
            else:
                libvirt_domains.undefine(dom)
            return {"xml": xml, "image": image, "state": state}

    def _undefine_or_put_back(self, conn, dom, name, scratch, state):
        try:
            libvirt_domains.undefine(dom)
        except libvirt.libvirtError:
            # Leave the VM as it was; failing that, hibernated, not lost.
            try:
                libvirt_domains.restore(conn, name, scratch, paused=state == states.PAUSED)
            except libvirt.libvirtError:
                os.replace(scratch, self.image_path(name))
            raise

    @pool_call("import {name!r}", check=_checked_import)
    def import_image(self, conn, name, spec, uuid_given, xml, image, state):
        """Counterpart of export_image: ``image`` is its whole result."""
        with self._locks.hold(name):
            if libvirt_domains.lookup_or_none(conn, name) is not None:
                raise InvalidRequest(f"cannot import VM {name!r}: a VM of that name "
                                     f"already exists on {self.uri}")
            # Another host's definitions: nothing is defined unless they are
            # what this host would define itself (usher.lnm.received_xml).
            reach = self._import_checks.reach(conn, spec, driver=self.driver,
                                              template=self._template)
            self._import_checks.check_definition(xml, spec, reach, uuid_given)
            if state == states.SHUTOFF:
                self._remove_image(name)
                return self._info_of(conn.defineXML(xml))
            hibernated = state == states.HIBERNATED
            scratch = self._scratch_path(name, "importing" if hibernated else "import")
            try:
                with open(scratch, "wb") as f:
                    f.write(image)
                self._import_checks.check_image(conn, scratch, spec, reach, uuid_given)
                dom = conn.defineXML(xml)
                if hibernated:
                    os.replace(scratch, self.image_path(name))
                    return self._info_of(dom)
                try:
                    dom = libvirt_domains.restore(conn, name, scratch,
                                             paused=state == states.PAUSED)
                except BaseException:
                    libvirt_domains.undefine_quietly(dom)
                    raise
                return self._info_of(dom)
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(scratch)

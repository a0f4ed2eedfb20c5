"""Round-robin placement for start and migrate requests.

VMs go to the connected LNMs in turn, skipping hosts without room (memory
and vCPUs times the overcommit ratios). The caller's LNM list is honoured
when ``honour_suggestion`` is on and a suggested LNM has room. A VM that fits
nowhere is dropped from the request with a reason naming each LNM's problem.
"""

CONFIG_SPEC = """
order = integer(default=50)
honour_suggestion = boolean(default=True)
memory_overcommit = float(default=1.0)
cpu_overcommit = float(default=16.0)
"""
DEFAULT_ORDER = 50


class Plugin:
    name = "roundrobin"

    def __init__(self, config, api):
        self.api = api
        self.order = config.get("order", DEFAULT_ORDER)
        self.honour_suggestion = config.get("honour_suggestion", True)
        self.memory_overcommit = config.get("memory_overcommit", 1.0)
        self.cpu_overcommit = config.get("cpu_overcommit", 16.0)
        self._cursor = 0

    def entry_point(self, event):
        request = event.request
        if request is None or request.kind not in ("start", "migrate"):
            return
        hosts = sorted(v.name for v in self.api.state.connected_vmms())
        load = self._load()
        for vm in list(request.vms):
            record = request.records.get(vm) or {}
            memory = record.get("memory_mib") or request.args.get("memory_mib") \
                or self.api.default_memory
            vcpus = record.get("vcpus") or request.args.get("vcpus") or self.api.default_vcpus
            exclude = {record.get("vmm")} if request.kind == "migrate" else set()
            candidates = [h for h in hosts if h not in exclude]
            if request.lnms and self.honour_suggestion:
                suggested = [h for h in request.lnms if h in candidates]
                reasons = {h: "not connected" for h in request.lnms if h not in hosts}
                reasons.update({h: "the VM is already there" for h in request.lnms
                                if h in exclude})
                candidates = suggested
            else:
                reasons = {}
            chosen = self._pick(candidates, load, memory, vcpus, reasons)
            if chosen is None:
                detail = "; ".join(f"{h}: {why}" for h, why in sorted(reasons.items()))
                request.drop(vm, f"no LNM has room ({detail or 'no LNM connected'})")
                continue
            request.place(vm, chosen)
            load[chosen][0] += memory
            load[chosen][1] += vcpus

    def _load(self):
        load = {}
        for vmm in self.api.state.connected_vmms():
            used_mem = used_cpu = 0
            for name in vmm.vms:
                rec = self.api.state.vms.get(name)
                if rec is not None and rec["state"] not in ("shutoff", "lost", "missing"):
                    used_mem += rec.get("memory_mib") or 0
                    used_cpu += rec.get("vcpus") or 0
            load[vmm.name] = [used_mem, used_cpu]
        return load

    def _pick(self, candidates, load, memory, vcpus, reasons):
        if not candidates:
            return None
        n = len(candidates)
        for i in range(n):
            host = candidates[(self._cursor + i) % n]
            info = self.api.state.vmms[host].info
            mem_cap = (info.get("memory_mib") or 0) * self.memory_overcommit
            cpu_cap = (info.get("cpus") or 0) * self.cpu_overcommit
            used_mem, used_cpu = load[host]
            if used_mem + memory > mem_cap:
                reasons[host] = f"memory {used_mem}+{memory} MiB > {mem_cap:g} MiB"
            elif used_cpu + vcpus > cpu_cap:
                reasons[host] = f"vCPUs {used_cpu}+{vcpus} > {cpu_cap:g}"
            else:
                self._cursor = (self._cursor + i + 1) % n
                return host
        return None

// The start dialog (#/start, over the VM table): cluster, count, memory,
// vCPUs, a host hint and args; progress counted from the live stream.
import { field, h, plural } from "../dom.js";
import { summary, track } from "./progress.js";

// "key=value" lines -> {key: value}; throws naming the bad line.
export function parseArgs(text) {
  const args = {};
  text.split("\n").forEach((line, i) => {
    const trimmed = line.trim();
    if (!trimmed) return;
    const eq = trimmed.indexOf("=");
    if (eq <= 0) throw new Error(`args line ${i + 1}: write key=value`);
    args[trimmed.slice(0, eq).trim()] = trimmed.slice(eq + 1).trim();
  });
  return args;
}

export function openStartDialog(app, onClose) {
  const cluster = h("input", { required: true, autocomplete: "off", spellcheck: "false", pattern: "[a-z0-9][a-z0-9-]*" });
  const count = h("input", { type: "number", min: "1", max: "100000", value: "1", required: true });
  const memory = h("input", { type: "number", min: "1", placeholder: "site default" });
  const vcpus = h("input", { type: "number", min: "1", placeholder: "site default" });
  const hosts = h("input", { autocomplete: "off", spellcheck: "false", list: "start-host-list" });
  const hostList = h("datalist", { id: "start-host-list" });
  const args = h("textarea", { rows: "3", spellcheck: "false" });
  const error = h("p", { class: "error", role: "alert", hidden: true, id: "start-error" });
  const progress = h("p", { class: "note", "aria-live": "polite", id: "start-progress" });
  const submit = h("button", { type: "submit", class: "primary", id: "start-submit" }, "Start");
  const cancel = h("button", { type: "button", id: "start-cancel" }, "Close");
  const form = h("form", { class: "stack", method: "dialog" },
    field("start-cluster", "Cluster", cluster),
    field("start-count", "Number of VMs", count),
    field("start-memory", "Memory (MiB)", memory),
    field("start-vcpus", "vCPUs", vcpus),
    field("start-hosts", "Hosts (optional)", hosts, "a hint: host names, comma-separated"),
    hostList,
    field("start-args", "Args (optional)", args, "one key=value a line"),
    error, progress, h("div", { class: "buttons" }, submit, cancel));
  const dialog = h("dialog", { "aria-labelledby": "start-title", id: "start-dialog" },
    h("h2", { id: "start-title" }, "Start VMs"), form);

  app.api.lnms().then((answer) => {
    hostList.replaceChildren(...(answer.lnms || []).map((l) => h("option", { value: l.name })));
  }).catch(() => {});

  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    if (dialog.open) dialog.close();
    dialog.remove();
  };
  cancel.addEventListener("click", () => {
    close();
    onClose();
  });
  dialog.addEventListener("cancel", (e) => {
    e.preventDefault();
    close();
    onClose();
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    let body;
    try {
      body = { cluster: cluster.value.trim(), count: Number(count.value) };
      if (!body.cluster) throw new Error("give a cluster name");
      if (!Number.isInteger(body.count) || body.count < 1) throw new Error("the number of VMs must be a positive whole number");
      if (memory.value) body.memory_mib = Number(memory.value);
      if (vcpus.value) body.vcpus = Number(vcpus.value);
      const hostNames = hosts.value.split(",").map((s) => s.trim()).filter(Boolean);
      if (hostNames.length) body.lnms = hostNames;
      const parsed = parseArgs(args.value);
      if (Object.keys(parsed).length) body.args = parsed;
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
      return;
    }
    // Progress: VMs of the cluster in run that were not before.
    const before = new Set([...app.stream.vms.values()]
      .filter((r) => r.cluster === body.cluster && r.state === "run").map((r) => r.name));
    const reached = (vms) => {
      let n = 0;
      for (const r of vms.values()) if (r.cluster === body.cluster && r.state === "run" && !before.has(r.name)) n++;
      return n;
    };
    const stop = track(app, { label: `Starting ${plural(body.count, "VM")} in ${body.cluster}`, total: body.count, reached });
    const showProgress = app.stream.subscribe(() => {
      progress.textContent = `${reached(app.stream.vms)} of ${body.count} running`;
    });
    submit.disabled = true;
    progress.replaceChildren(h("span", { class: "spinner", "aria-hidden": "true" }), "starting…");
    try {
      const result = await app.api.start(body);
      stop();
      showProgress();
      const text = summary("start", result);
      app.status(text, { keep: true });
      if (result.failed && result.failed.length && !(result.started || []).length) {
        error.textContent = text;
        error.hidden = false;
        progress.textContent = "";
        return;
      }
      close();
      onClose();
    } catch (e) {
      stop();
      showProgress();
      app.status("");
      progress.textContent = "";
      error.textContent = e.message;
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });

  document.body.append(dialog);
  dialog.showModal();
  cluster.focus();
  return close;
}

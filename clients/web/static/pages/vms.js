// #/vms: the VM table, live (rows change as the stream's changes arrive),
// with filters, a selection and the operations of Table 3 on it; #/start
// opens the start dialog over it.
import { field, h, plural } from "../dom.js";
import { makeFilter, sortedNames, VirtualTable } from "../table.js";
import { openStartDialog } from "./start.js";
import { PAST, RESULT_STATE, summary, track, VERB } from "./progress.js";

const STATES = ["run", "paused", "hibernated", "shutoff", "starting", "migrating", "lost", "missing", "unknown"];
const OPERATIONS = ["pause", "resume", "shutdown", "reboot", "hibernate", "restore", "cycle", "destroy", "delete"];
// Operations that stop or lose what runs in the VM: confirmed first.
const DESTRUCTIVE = new Set(["destroy", "shutdown", "cycle", "reboot", "delete"]);
// What each destructive operation does to the selected VMs, for its confirmation.
const CONSEQUENCE = {
  destroy: (it) => `${it} powered off at once (kept, shut off).`,
  delete: (it) => `${it} removed for good; VMs that run are refused (destroy or shut them down first).`,
};

// Kept across visits to the page.
const filters = { regex: "", cluster: "", state: "", lnm: "" };


function options(select, values, allLabel) {
  const chosen = select.value;
  select.replaceChildren(h("option", { value: "" }, allLabel), ...values.map((v) => h("option", { value: v }, v)));
  select.value = values.includes(chosen) ? chosen : "";
}

export function confirmDialog(message, confirmLabel) {
  return new Promise((resolve) => {
    const yes = h("button", { type: "button", class: "danger", id: "confirm-yes" }, confirmLabel);
    const no = h("button", { type: "button", id: "confirm-no" }, "Cancel");
    const dialog = h("dialog", { "aria-labelledby": "confirm-title", id: "confirm-dialog" },
      h("h2", { id: "confirm-title" }, "Please confirm"), h("p", {}, message),
      h("div", { class: "buttons" }, yes, no));
    const done = (answer) => {
      dialog.close();
      dialog.remove();
      resolve(answer);
    };
    yes.addEventListener("click", () => done(true));
    no.addEventListener("click", () => done(false));
    dialog.addEventListener("cancel", (e) => {
      e.preventDefault();
      done(false);
    });
    document.body.append(dialog);
    dialog.showModal();
    no.focus();
  });
}

export function render(app, params) {
  const stream = app.stream;
  let order = [];          // every name, sorted
  let dirtyOrder = true;
  let filter = makeFilter(filters);

  const regex = h("input", { type: "search", value: filters.regex, placeholder: "e.g. ^web", spellcheck: "false",
    "aria-describedby": "regex-error" });
  const regexError = h("span", { id: "regex-error", class: "hint", "aria-live": "polite" });
  const cluster = h("select", {});
  const state = h("select", {});
  const host = h("select", {});
  options(state, STATES, "any state");
  state.value = filters.state;
  const summaryLine = h("p", { class: "summary", id: "vm-summary", "aria-live": "polite" });
  const count = h("span", { class: "count", id: "selection-count" }, "0 selected");
  const opButtons = OPERATIONS.map((op) => h("button", {
    type: "button", class: DESTRUCTIVE.has(op) ? "op op-danger" : "op", dataset: { op }, disabled: true,
    onclick: () => operate(op),
  }, op));
  const migrateTarget = h("select", { "aria-label": "migrate to host" });
  const migrateButton = h("button", { type: "button", disabled: true, onclick: () => migrate() }, "migrate");

  const table = new VirtualTable({
    label: "Your VMs",
    onOpen: (name) => app.navigate(`#/vm/${encodeURIComponent(name)}`),
    onSelection: (selected) => {
      count.textContent = `${selected.size} selected`;
      for (const b of opButtons) b.disabled = selected.size === 0;
      migrateButton.disabled = selected.size === 0 || !migrateTarget.value;
    },
  });

  function refresh() {
    if (dirtyOrder) {
      order = sortedNames(stream.vms);
      dirtyOrder = false;
    }
    const clusters = new Set();
    const hosts = new Set();
    for (const record of stream.vms.values()) {
      if (record.cluster) clusters.add(record.cluster);
      if (record.lnm) hosts.add(record.lnm);
    }
    options(cluster, [...clusters].sort(), "any cluster");
    options(host, [...hosts].sort(), "any host");
    options(migrateTarget, [...hosts].sort(), "to host…");
    cluster.value = filters.cluster && clusters.has(filters.cluster) ? filters.cluster : cluster.value;
    host.value = filters.lnm && hosts.has(filters.lnm) ? filters.lnm : host.value;
    const shown = filter.active ? order.filter((n) => filter.test(stream.vms.get(n))) : order;
    table.setRows(stream.vms, shown);
    summaryLine.textContent = stream.ready
      ? `${plural(stream.vms.size, "VM")}${filter.active ? `, ${shown.length} shown` : ""}`
      : "Loading your VMs…";
  }

  let frame = 0;
  const schedule = () => {
    if (!frame) frame = requestAnimationFrame(() => {
      frame = 0;
      refresh();
    });
  };
  const unsubscribe = stream.subscribe((event) => {
    if (event.connection) return;
    if (event.reset || event.removed.length || event.changed.some((n) => !table.present || !table.present.has(n))) {
      dirtyOrder = true;
    }
    schedule();
  });

  function applyFilters() {
    filters.regex = regex.value;
    filters.cluster = cluster.value;
    filters.state = state.value;
    filters.lnm = host.value;
    try {
      filter = makeFilter(filters);
      regex.removeAttribute("aria-invalid");
      regexError.textContent = "";
    } catch (e) {
      regex.setAttribute("aria-invalid", "true");
      regexError.textContent = `not a valid regular expression: ${e.message}`;
      return;
    }
    schedule();
  }
  regex.addEventListener("input", applyFilters);
  for (const select of [cluster, state, host]) select.addEventListener("change", applyFilters);
  migrateTarget.addEventListener("change", () => table.notifySelection());

  async function run(operation, names, call) {
    const target = RESULT_STATE[operation];
    const wanted = new Set(names);
    const stop = track(app, {
      label: `${VERB[operation]} ${plural(names.length, "VM")}`,
      total: names.length,
      reached: (vms) => {
        let n = 0;
        for (const name of wanted) {
          const record = vms.get(name);
          if (target === null ? !record : record && record.state === target) n++;
        }
        return n;
      },
    });
    try {
      const result = await call();
      stop();
      app.status(summary(operation, result), { keep: true });
      if (result.failed && result.failed.length) app.alert(summary(operation, result));
    } catch (e) {
      stop();
      app.status("");
      app.alert(e.message);
    }
  }

  async function operate(operation) {
    const names = [...table.selected];
    if (!names.length) return;
    if (DESTRUCTIVE.has(operation)) {
      const what = names.length === 1 ? names[0] : plural(names.length, "VM");
      const it = names.length === 1 ? "It is" : "They are";
      const consequence = CONSEQUENCE[operation]
        ? CONSEQUENCE[operation](it)
        : `What runs in ${names.length === 1 ? "it" : "them"} is stopped.`;
      const ok = await confirmDialog(`${operation} ${what}? ${consequence}`,
        `${operation} ${plural(names.length, "VM")}`);
      if (!ok) return;
    }
    await run(operation, names, () => app.api.operate(operation, names));
  }

  async function migrate() {
    const names = [...table.selected];
    const target = migrateTarget.value;
    if (!names.length || !target) return;
    await run("migrate", names, () => app.api.migrate(names, [target]));
  }

  const selectAll = h("button", { type: "button", onclick: () => table.selectAll(true) }, "Select all matching");
  const selectNone = h("button", { type: "button", onclick: () => table.selectAll(false) }, "Clear selection");
  const startButton = h("button", { type: "button", class: "primary", onclick: () => app.navigate("#/start") },
    "Start VMs…");

  app.main.append(
    h("h1", {}, "Your VMs"),
    h("section", { "aria-label": "Filters", class: "filters" },
      field("filter-regex", "Name (regular expression)", regex),
      field("filter-cluster", "Cluster", cluster),
      field("filter-state", "State", state),
      field("filter-host", "Host", host),
      regexError),
    h("section", { "aria-label": "Actions", class: "actions" },
      count, selectAll, selectNone, ...opButtons, migrateTarget, migrateButton, startButton),
    summaryLine,
    table.element,
    h("p", { class: "note" },
      "Keyboard: Up/Down, Page Up/Down, Home/End move; Space selects; Shift+Up/Down extends; Enter opens."),
  );
  refresh();

  let closeDialog = null;
  if (params.start) {
    closeDialog = openStartDialog(app, () => app.navigate("#/vms"));
  }
  return () => {
    unsubscribe();
    cancelAnimationFrame(frame);
    table.destroy();
    if (closeDialog) closeDialog();
  };
}

export { DESTRUCTIVE, OPERATIONS, PAST };

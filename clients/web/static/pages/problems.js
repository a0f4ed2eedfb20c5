// #/admin/problems (administrators): VMs lost (their host stopped
// answering), missing (vanished from their host) and unmanaged (running on a
// host without a record). Lost and missing ones follow the live stream.
import { argsText, h } from "../dom.js";

const SECTIONS = [
  ["lost", "Lost", "their host stopped answering"],
  ["missing", "Missing", "vanished from the host where they were last seen"],
  ["unmanaged", "Unmanaged", "found on a host with no record in Usher"],
];

function text(value) {
  return value === undefined || value === null ? "" : typeof value === "object" ? JSON.stringify(value) : String(value);
}

export function render(app) {
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const bodies = {};
  const counts = {};
  const sections = SECTIONS.map(([key, title, about]) => {
    bodies[key] = h("tbody", {});
    counts[key] = h("span", {});
    return h("section", { "aria-labelledby": `problems-${key}`, id: `problems-${key}-section` },
      h("h2", { id: `problems-${key}` }, `${title} `, counts[key]), h("p", { class: "note" }, `VMs ${about}.`),
      h("div", { class: "scroll-x" }, h("table", { class: "plain" },
        h("thead", {}, h("tr", {}, ...["Name", "Owner", "Host", "State", "Args"].map((t) => h("th", { scope: "col" }, t)))),
        bodies[key])));
  });
  let stopped = false;

  async function load() {
    try {
      const d = await app.api.problems();
      if (stopped) return;
      for (const [key] of SECTIONS) {
        const items = (d[key] || []).map((item) => (typeof item === "string" ? { name: item } : item));
        counts[key].textContent = `(${items.length})`;
        bodies[key].replaceChildren(...items.map((r) => h("tr", { dataset: { name: text(r.name) } },
          h("td", {}, text(r.name)), h("td", {}, text(r.owner)), h("td", {}, text(r.lnm)),
          h("td", {}, text(r.state)), h("td", {}, argsText(r.args)))));
        if (!items.length) bodies[key].append(h("tr", {}, h("td", { colspan: "5" }, "None.")));
      }
    } catch (e) {
      if (stopped) return;
      error.textContent = e.message;
      error.hidden = false;
    }
  }
  // A VM turning lost or missing (or back) arrives on the stream: re-read.
  let pending = 0;
  const unsubscribe = app.stream.subscribe((event) => {
    if (event.connection || pending) return;
    const touched = event.reset || event.removed.length
      || event.changed.some((n) => ["lost", "missing"].includes((app.stream.vms.get(n) || {}).state));
    if (touched) pending = setTimeout(() => { pending = 0; load(); }, 300);
  });
  const reload = h("button", { type: "button", onclick: () => load() }, "Check again");
  app.main.append(h("h1", {}, "Problems"), error, h("div", { class: "buttons" }, reload), ...sections);
  load();
  return () => {
    stopped = true;
    clearTimeout(pending);
    unsubscribe();
  };
}

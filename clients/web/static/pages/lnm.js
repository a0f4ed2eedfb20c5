// #/lnm/NAME: one host: its figures, its load and memory plotted over time,
// and the VMs on it (the caller's, live from the stream).
import { figure, h, mib } from "../dom.js";
import { figuresOf, hostFacts, refreshEvery, sampleTime, TimePlot, triple } from "../plots.js";
import { VirtualTable } from "../table.js";

const REFRESH_MS = 5000;

export function render(app, { name }) {
  const facts = h("dl", { class: "record", id: "lnm-record" });
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const cpu = new TimePlot({ title: "Load: CPU % of the host", series: ["1 min", "5 min", "15 min"], unit: "%" });
  const mem = new TimePlot({ title: "Memory used (MiB)", series: ["1 min", "5 min", "15 min"] });
  cpu.element.id = "lnm-cpu-plot";
  const table = new VirtualTable({ label: `VMs on ${name}`, onOpen: (vm) => app.navigate(`#/vm/${encodeURIComponent(vm)}`) });
  const count = h("p", { class: "summary", "aria-live": "polite" });

  function showVms() {
    const names = [...app.stream.vms.values()].filter((r) => r.lnm === name).map((r) => r.name)
      .sort(new Intl.Collator("en", { numeric: true }).compare);
    table.setRows(app.stream.vms, names);
    count.textContent = `${names.length} of your VMs on ${name}`;
  }

  function show(lnm) {
    const figs = figuresOf(lnm);
    const rows = hostFacts(lnm, mib, figure);
    facts.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v === undefined ? "" : String(v))]));
    if (figs) {
      cpu.push(sampleTime(figs), triple(figs, "cpu"));
      mem.push(sampleTime(figs), triple(figs, "memory_used"));
    }
  }

  let frame = 0;
  const unsubscribe = app.stream.subscribe((event) => {
    if (event.connection || frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      showVms();
    });
  });
  app.main.append(h("p", {}, h("a", { href: "#/lnms" }, "← all hosts")), h("h1", {}, name), error, facts,
    h("div", { class: "plots" }, cpu.element, mem.element),
    h("h2", {}, "VMs on this host"), count, table.element);
  showVms();
  const stop = refreshEvery(REFRESH_MS, () => app.api.lnm(name), (answer) => show(answer.lnm || answer), error);
  return () => {
    stop();
    cancelAnimationFrame(frame);
    unsubscribe();
    table.destroy();
    cpu.destroy();
    mem.destroy();
  };
}

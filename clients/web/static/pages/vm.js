// #/vm/NAME: the record, its figures as text, and uPlot plots of the 1/5/15-
// minute CPU and memory averages over time. The state is live (the stream);
// figures are measured by the LNM every few seconds and re-read every 5 s.
import { argsText, figure, h, mib } from "../dom.js";
import { figuresOf, refreshEvery, sampleTime, TimePlot, triple } from "../plots.js";

const REFRESH_MS = 5000;

export function render(app, { name }) {
  const fields = h("dl", { class: "record", id: "vm-record" });
  const figuresText = h("dl", { class: "record", id: "vm-figures" });
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const cpuPlot = new TimePlot({ title: "CPU (% of one host CPU)", series: ["1 min", "5 min", "15 min"], unit: "%" });
  const memPlot = new TimePlot({ title: "Memory used (MiB)", series: ["1 min", "5 min", "15 min"], unit: "" });
  cpuPlot.element.id = "vm-cpu-plot";
  memPlot.element.id = "vm-mem-plot";

  function showRecord(record) {
    const rows = [["Name", record.name], ["State", record.state], ["Owner", record.owner],
      ["Cluster", record.cluster], ["Host", record.lnm || ""], ["Memory", mib(record.memory_mib)],
      ["vCPUs", record.vcpus], ["UUID", record.uuid], ["Args", argsText(record.args)]];
    fields.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k),
      h("dd", { dataset: { field: k.toLowerCase() } }, v === undefined || v === null ? "" : String(v))]));
  }

  function showFigures(figures) {
    if (!figures) {
      figuresText.replaceChildren(h("dt", {}, "Figures"), h("dd", {}, "none yet (the VM is not running, or its host has not reported)"));
      return;
    }
    const rows = [["CPU %", triple(figures, "cpu")], ["Memory used (MiB)", triple(figures, "memory_used")]];
    figuresText.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k),
      h("dd", { dataset: { figure: k === "CPU %" ? "cpu" : "memory" } }, v.map((x) => figure(x)).join(" / "))]),
    h("dt", {}, "Source"), h("dd", {}, figures.source || ""));
    const t = sampleTime(figures);
    cpuPlot.push(t, triple(figures, "cpu"));
    memPlot.push(t, triple(figures, "memory_used"));
  }

  const unsubscribe = app.stream.subscribe((event) => {
    if (event.connection) return;
    const record = app.stream.vms.get(name);
    if (record && (event.reset || event.changed.includes(name))) showRecord(record);
    if (event.removed.includes(name)) {
      error.textContent = `${name} no longer exists.`;
      error.hidden = false;
    }
  });

  app.main.append(h("p", {}, h("a", { href: "#/vms" }, "← all VMs")), h("h1", {}, name), error,
    h("section", { "aria-labelledby": "vm-details" }, h("h2", { id: "vm-details" }, "Details"), fields),
    h("section", { "aria-labelledby": "vm-figs" }, h("h2", { id: "vm-figs" }, "Figures (1 / 5 / 15-minute averages)"),
      figuresText, h("div", { class: "plots" }, cpuPlot.element, memPlot.element)));
  const known = app.stream.vms.get(name);
  if (known) showRecord(known);
  const stop = refreshEvery(REFRESH_MS, () => app.api.vm(name), (record) => {
    showRecord(app.stream.vms.get(record.name) || record);
    showFigures(figuresOf(record));
  }, error);
  return () => {
    stop();
    unsubscribe();
    cpuPlot.destroy();
    memPlot.destroy();
  };
}

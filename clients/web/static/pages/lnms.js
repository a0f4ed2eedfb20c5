// #/lnms: every host (LNM) with its load plotted (1/5/15-minute CPU) and how
// many VMs it runs; the figures are re-read every 5 s (the LNMs report them
// every few seconds), the VM counts follow the live stream.
import { figure, h, mib } from "../dom.js";
import { figuresOf, hostFacts, refreshEvery, sampleTime, TimePlot, triple } from "../plots.js";

const REFRESH_MS = 5000;

export function render(app) {
  const cards = h("div", { class: "host-cards", id: "host-cards" });
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const shown = new Map();   // name -> {card, plot, facts, vmCount}

  function vmCount(name) {
    let n = 0;
    for (const r of app.stream.vms.values()) if (r.lnm === name) n++;
    return n;
  }

  function card(lnm) {
    let entry = shown.get(lnm.name);
    if (!entry) {
      const plot = new TimePlot({ title: "Load: CPU % of the host", series: ["1 min", "5 min", "15 min"], unit: "%", height: 140 });
      const facts = h("dl", { class: "record" });
      const yours = h("p", { class: "note" });
      const el = h("article", { class: "host-card", dataset: { lnm: lnm.name }, "aria-labelledby": `host-${lnm.name}` },
        h("h2", { id: `host-${lnm.name}` }, h("a", { href: `#/lnm/${encodeURIComponent(lnm.name)}` }, lnm.name)),
        facts, yours, plot.element);
      cards.append(el);
      entry = { el, plot, facts, yours };
      shown.set(lnm.name, entry);
    }
    const figs = figuresOf(lnm);
    const rows = hostFacts(lnm, mib, figure).slice(0, -1);
    entry.facts.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v === undefined ? "" : String(v))]));
    entry.yours.textContent = `${vmCount(lnm.name)} of your VMs here`;
    if (figs) entry.plot.push(sampleTime(figs), triple(figs, "cpu"));
  }

  const unsubscribe = app.stream.subscribe((event) => {
    if (event.connection) return;
    for (const [name, entry] of shown) entry.yours.textContent = `${vmCount(name)} of your VMs here`;
  });
  app.main.append(h("h1", {}, "Hosts"), error, cards);
  const stop = refreshEvery(REFRESH_MS, () => app.api.lnms(), (answer) => {
    const lnms = [...(answer.lnms || [])].sort((a, b) => a.name.localeCompare(b.name, "en", { numeric: true }));
    for (const lnm of lnms) card(lnm);
    if (!lnms.length) cards.replaceChildren(h("p", {}, "No hosts yet."));
  }, error);
  return () => {
    stop();
    unsubscribe();
    for (const entry of shown.values()) entry.plot.destroy();
  };
}

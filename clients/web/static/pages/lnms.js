// #/lnms: every host (LNM) with its load plotted (1/5/15-minute CPU) and how
// many VMs it runs; the figures are re-read every 5 s (the LNMs report them
// every few seconds), the VM counts follow the live stream.
import { figure, h, mib } from "../dom.js";
import { figuresOf, sampleTime, TimePlot, triple } from "../plots.js";

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
    const rows = [["Connected", lnm.connected ? "yes" : "no"], ["VMs (all users)", lnm.vms], ["CPUs", lnm.cpus],
      ["Memory", mib(lnm.memory_mib)], ["Free memory", mib((figs && figs.free_memory_mib) ?? lnm.free_memory_mib)],
      ["CPU % 1/5/15 min", figs ? triple(figs, "cpu").map((v) => figure(v)).join(" / ") : "-"]];
    entry.facts.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v === undefined ? "" : String(v))]));
    entry.yours.textContent = `${vmCount(lnm.name)} of your VMs here`;
    if (figs) entry.plot.push(sampleTime(figs), triple(figs, "cpu"));
  }

  let timer = 0;
  let stopped = false;
  let lastLnms = [];
  async function load() {
    try {
      const answer = await app.api.lnms();
      if (stopped) return;
      error.hidden = true;
      lastLnms = [...(answer.lnms || [])].sort((a, b) => a.name.localeCompare(b.name, "en", { numeric: true }));
      for (const lnm of lastLnms) card(lnm);
      if (!lastLnms.length) cards.replaceChildren(h("p", {}, "No hosts yet."));
    } catch (e) {
      if (stopped) return;
      error.textContent = e.message;
      error.hidden = false;
    }
    if (!stopped) timer = setTimeout(load, REFRESH_MS);
  }
  const unsubscribe = app.stream.subscribe((event) => {
    if (event.connection) return;
    for (const [name, entry] of shown) entry.yours.textContent = `${vmCount(name)} of your VMs here`;
  });
  app.main.append(h("h1", {}, "Hosts"), error, cards);
  load();
  return () => {
    stopped = true;
    clearTimeout(timer);
    unsubscribe();
    for (const entry of shown.values()) entry.plot.destroy();
  };
}

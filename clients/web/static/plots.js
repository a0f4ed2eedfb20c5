// Figures over time with uPlot (static/vendor/, installed by make setup).
// A TimePlot keeps the points the page has seen (figures the LNMs measured:
// each sample's 1/5/15-minute averages, by the time it was sampled) and
// redraws them; the latest values are also shown as text beside it, for
// screen readers and for anyone who wants the number.

import uPlot from "./vendor/uPlot.esm.js";
import { h } from "./dom.js";

const COLOURS = ["#1f6feb", "#d97706", "#15803d", "#9333ea"];
const MAX_POINTS = 720;

export class TimePlot {
  // series: ["1 min", "5 min", "15 min"]; unit: "%" or "MiB"
  constructor({ title, series, unit = "", height = 180 }) {
    this.title = title;
    this.series = series;
    this.unit = unit;
    this.height = height;
    this.data = [[], ...series.map(() => [])];
    this.canvasHolder = h("div", { class: "plot-canvas", "aria-hidden": "true" });
    this.latest = h("p", { class: "plot-latest", "aria-live": "off" }, "no figures yet");
    this.element = h("figure", { class: "plot", dataset: { points: "0" } },
      h("figcaption", {}, title), this.canvasHolder, this.latest);
    this.chart = null;
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(this.element);
  }

  width() {
    return Math.max(240, Math.floor(this.element.clientWidth || 320) - 8);
  }

  ensureChart() {
    if (this.chart) return;
    const opts = {
      width: this.width(),
      height: this.height,
      series: [{}, ...this.series.map((label, i) => ({
        label, stroke: COLOURS[i % COLOURS.length], width: 2,
        value: (u, v) => (v === null || v === undefined ? "n/a" : `${v.toFixed(1)}${this.unit}`),
      }))],
      axes: [{}, { values: (u, ticks) => ticks.map((t) => `${t}${this.unit}`), size: 60 }],
      // At least the last 5 minutes across (one sample is not a year-wide
      // axis), and figures from 0 up.
      scales: {
        x: { time: true, auto: false },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] },
      },
      legend: { show: true },
    };
    this.chart = new uPlot(opts, this.data, this.canvasHolder);
  }

  // values: one number (or null) per series, at time t (seconds).
  push(t, values) {
    const xs = this.data[0];
    if (xs.length && t <= xs[xs.length - 1]) {
      if (t < xs[xs.length - 1]) return;    // older than what we have
      values.forEach((v, i) => { this.data[i + 1][xs.length - 1] = v; });   // same sample
    } else {
      xs.push(t);
      values.forEach((v, i) => this.data[i + 1].push(v));
      if (xs.length > MAX_POINTS) this.data.forEach((column) => column.shift());
    }
    this.ensureChart();
    this.chart.setData(this.data, false);
    const last = xs[xs.length - 1];
    this.chart.setScale("x", { min: Math.min(xs[0], last - 300), max: last + 5 });
    this.element.dataset.points = String(xs.length);
    this.latest.textContent = this.series.map((label, i) => {
      const v = values[i];
      return `${label}: ${typeof v === "number" ? v.toFixed(1) : "n/a"}${typeof v === "number" ? this.unit : ""}`;
    }).join(", ");
  }

  resize() {
    if (this.chart) this.chart.setSize({ width: this.width(), height: this.height });
  }

  destroy() {
    this.observer.disconnect();
    if (this.chart) this.chart.destroy();
  }
}

// The figures of a record (nested under "status", or at its top level).
export function figuresOf(record) {
  if (!record) return null;
  const status = record.status && typeof record.status === "object" ? record.status : record;
  return "cpu" in status || "memory_used" in status ? status : null;
}

// A sample's time in seconds: its sampled_at when the LNM gave one, else now.
export function sampleTime(figures) {
  const at = figures && figures.sampled_at;
  return typeof at === "number" ? at : Date.now() / 1000;
}

export function triple(figures, key) {
  const values = figures && figures[key];
  return Array.isArray(values) ? [0, 1, 2].map((i) => (typeof values[i] === "number" ? values[i] : null))
    : [null, null, null];
}

// Re-read figures every ``ms`` while a page shows them: fetch() -> answer,
// show(answer); a failure is shown in ``error`` (a hidden <p>) and retried.
// -> stop(). (Figures are measured by the LNMs every few seconds and have no
// change event; states and placements come from the stream.)
export function refreshEvery(ms, fetch, show, error) {
  let timer = 0;
  let stopped = false;
  async function load() {
    try {
      const answer = await fetch();
      if (stopped) return;
      error.hidden = true;
      show(answer);
    } catch (e) {
      if (stopped) return;
      error.textContent = e.message;
      error.hidden = false;
    }
    if (!stopped) timer = setTimeout(load, ms);
  }
  load();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

// The facts of a host (LNM) record, as [label, value] rows.
export function hostFacts(lnm, mib, figure) {
  const figs = figuresOf(lnm);
  return [["Connected", lnm.connected ? "yes" : "no"], ["VMs (all users)", lnm.vms], ["CPUs", lnm.cpus],
    ["Memory", mib(lnm.memory_mib)], ["Committed (VMs' configured memory)", mib(lnm.committed_memory_mib)],
    ["Measured free memory", mib((figs && figs.free_memory_mib) ?? lnm.free_memory_mib)],
    ["CPU % 1/5/15 min", figs ? triple(figs, "cpu").map((v) => figure(v)).join(" / ") : "-"],
    ["Figures", (figs && figs.source) || "none yet"]];
}

// The VM table: virtual scrolling over the in-memory map of the stream's
// records (only the rows in view, plus a margin, exist in the DOM, so 10,000
// VMs scroll without a stall), filters, selection and keyboard use.
//
// Keyboard (the grid has one tab stop): Up/Down, Page Up/Down, Home/End move
// the active row; Space selects it; Shift+Up/Down extends the selection;
// Enter opens the VM's page. Shift-click on a checkbox selects a range.

import { argsText, h, mib } from "./dom.js";

const ROW_HEIGHT = 36;
const OVERSCAN = 8;
const collator = new Intl.Collator("en", { numeric: true });

export const COLUMNS = [
  { key: "name", title: "Name", cls: "c-name" },
  { key: "state", title: "State", cls: "c-state" },
  { key: "cluster", title: "Cluster", cls: "c-cluster" },
  { key: "lnm", title: "Host", cls: "c-host" },
  { key: "memory_mib", title: "Memory", cls: "c-mem", render: (r) => mib(r.memory_mib) },
  { key: "vcpus", title: "vCPUs", cls: "c-cpus" },
  { key: "args", title: "Args", cls: "c-args", render: (r) => argsText(r.args) },
];

// A filter over records: regex (the browser's RegExp, on the name: for the
// local map only; requests that select by regex go to the server's RE2),
// cluster, state and host (exact). -> {test(record)} or throws SyntaxError.
export function makeFilter({ regex = "", cluster = "", state = "", lnm = "" }) {
  const pattern = regex ? new RegExp(regex) : null;
  return {
    active: Boolean(pattern || cluster || state || lnm),
    test(record) {
      if (cluster && record.cluster !== cluster) return false;
      if (state && record.state !== state) return false;
      if (lnm && (record.lnm || "") !== lnm) return false;
      if (pattern && !pattern.test(record.name)) return false;
      return true;
    },
  };
}

export function sortedNames(map) {
  return [...map.keys()].sort(collator.compare);
}

export class VirtualTable {
  // options: {label, onOpen(name), onSelection(selectedSet), columns}
  constructor(options) {
    this.options = options;
    this.columns = options.columns || COLUMNS;
    this.records = new Map();
    this.names = [];          // the rows shown (filtered, sorted)
    this.selected = new Set();
    this.active = 0;
    this.anchor = null;
    this.pool = [];
    this.frame = 0;

    this.viewport = h("div", { class: "vt-viewport", tabindex: "-1" });
    this.spacer = h("div", { class: "vt-spacer", "aria-hidden": "true" });
    this.body = h("div", { class: "vt-body", role: "rowgroup" });
    this.viewport.append(this.spacer, this.body);
    const headerCells = [h("div", { class: "vt-cell c-select", role: "columnheader" },
      h("span", { class: "visually-hidden" }, "Selected"))];
    for (const column of this.columns) {
      headerCells.push(h("div", { class: `vt-cell ${column.cls}`, role: "columnheader" }, column.title));
    }
    this.header = h("div", { class: "vt-head", role: "rowgroup" },
      h("div", { class: "vt-row vt-header-row", role: "row", "aria-rowindex": "1" }, headerCells));
    this.empty = h("p", { class: "vt-empty", hidden: true }, "No VMs match.");
    this.element = h("div", {
      class: "vt", role: "grid", tabindex: "0", "aria-label": options.label || "VMs",
      "aria-multiselectable": "true", "aria-rowcount": "1",
      onkeydown: (e) => this.keydown(e),
    }, this.header, this.viewport, this.empty);
    this.viewport.addEventListener("scroll", () => this.schedule(), { passive: true });
    this.resizeObserver = new ResizeObserver(() => this.schedule());
    this.resizeObserver.observe(this.viewport);
  }

  destroy() {
    this.resizeObserver.disconnect();
    cancelAnimationFrame(this.frame);
  }

  setRows(records, names) {
    this.records = records;
    this.names = names;
    const present = new Set(names);
    for (const name of [...this.selected]) {
      if (!records.has(name)) this.selected.delete(name);
    }
    if (this.active >= names.length) this.active = Math.max(0, names.length - 1);
    this.present = present;
    this.element.setAttribute("aria-rowcount", String(names.length + 1));
    this.spacer.style.height = `${names.length * ROW_HEIGHT}px`;
    // As tall as its rows, up to the CSS max-height (then it scrolls).
    this.viewport.style.height = `${Math.max(1, names.length) * ROW_HEIGHT + 2}px`;
    this.empty.hidden = names.length > 0;
    this.schedule();
    this.notifySelection();
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  // Draw the rows in view now (also called by schedule's frame).
  render() {
    const top = this.viewport.scrollTop;
    const height = this.viewport.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW_HEIGHT) - OVERSCAN);
    const last = Math.min(this.names.length, Math.ceil((top + height) / ROW_HEIGHT) + OVERSCAN);
    const needed = last - first;
    while (this.pool.length < needed) this.pool.push(this.makeRow());
    while (this.pool.length > needed) this.pool.pop().remove();
    for (let i = 0; i < needed; i++) this.fillRow(this.pool[i], first + i);
    this.element.removeAttribute("aria-activedescendant");
    const activeRow = this.pool[this.active - first];
    if (activeRow) this.element.setAttribute("aria-activedescendant", activeRow.id);
  }

  makeRow() {
    const row = h("div", { class: "vt-row", role: "row" });
    row.id = `vt-row-${Math.random().toString(36).slice(2)}`;
    const box = h("input", { type: "checkbox", tabindex: "-1" });
    box.addEventListener("click", (e) => this.checkboxClicked(row, e));
    row.append(h("div", { class: "vt-cell c-select", role: "gridcell" }, box));
    for (const column of this.columns) {
      const cell = h("div", { class: `vt-cell ${column.cls}`, role: "gridcell" });
      if (column.key === "name") {
        cell.append(h("a", { href: "#", tabindex: "-1" }));
      }
      row.append(cell);
    }
    row.addEventListener("click", (e) => {
      if (e.target instanceof HTMLInputElement || e.target instanceof HTMLAnchorElement) return;
      this.active = Number(row.dataset.index);
      this.render();
    });
    this.body.append(row);
    return row;
  }

  fillRow(row, index) {
    const name = this.names[index];
    const record = this.records.get(name) || { name };
    row.dataset.index = String(index);
    row.dataset.name = name;
    row.dataset.state = record.state || "";
    row.setAttribute("aria-rowindex", String(index + 2));
    const selected = this.selected.has(name);
    row.setAttribute("aria-selected", selected ? "true" : "false");
    row.classList.toggle("is-active", index === this.active);
    row.style.transform = `translateY(${index * ROW_HEIGHT}px)`;
    const cells = row.children;
    const box = cells[0].firstChild;
    box.checked = selected;
    box.setAttribute("aria-label", `select ${name}`);
    this.columns.forEach((column, i) => {
      const cell = cells[i + 1];
      const value = column.render ? column.render(record) : record[column.key];
      const text = value === undefined || value === null ? "" : String(value);
      if (column.key === "name") {
        const link = cell.firstChild;
        link.href = `#/vm/${encodeURIComponent(name)}`;
        if (link.textContent !== text) link.textContent = text;
      } else if (cell.textContent !== text) {
        cell.textContent = text;
      }
      if (column.key === "state") cell.className = `vt-cell ${column.cls} state-${text}`;
    });
  }

  checkboxClicked(row, event) {
    const index = Number(row.dataset.index);
    const name = this.names[index];
    const on = event.target.checked;
    if (event.shiftKey && this.anchor !== null) {
      const [from, to] = [Math.min(this.anchor, index), Math.max(this.anchor, index)];
      for (let i = from; i <= to; i++) {
        if (on) this.selected.add(this.names[i]);
        else this.selected.delete(this.names[i]);
      }
    } else if (on) {
      this.selected.add(name);
    } else {
      this.selected.delete(name);
    }
    this.anchor = index;
    this.active = index;
    this.render();
    this.notifySelection();
  }

  toggle(index) {
    const name = this.names[index];
    if (name === undefined) return;
    if (this.selected.has(name)) this.selected.delete(name);
    else this.selected.add(name);
    this.anchor = index;
    this.notifySelection();
  }

  selectAll(on = true) {
    if (on) for (const name of this.names) this.selected.add(name);
    else this.selected.clear();
    this.render();
    this.notifySelection();
  }

  notifySelection() {
    if (this.options.onSelection) this.options.onSelection(this.selected);
  }

  moveTo(index, extend = false) {
    if (!this.names.length) return;
    const target = Math.max(0, Math.min(this.names.length - 1, index));
    if (extend) {
      this.selected.add(this.names[this.active]);
      this.selected.add(this.names[target]);
      this.notifySelection();
    }
    this.active = target;
    const top = target * ROW_HEIGHT;
    const view = this.viewport;
    if (top < view.scrollTop) view.scrollTop = top;
    else if (top + ROW_HEIGHT > view.scrollTop + view.clientHeight) {
      view.scrollTop = top + ROW_HEIGHT - view.clientHeight;
    }
    this.render();
  }

  keydown(event) {
    const page = Math.max(1, Math.floor((this.viewport.clientHeight || 600) / ROW_HEIGHT) - 1);
    const keys = {
      ArrowDown: () => this.moveTo(this.active + 1, event.shiftKey),
      ArrowUp: () => this.moveTo(this.active - 1, event.shiftKey),
      PageDown: () => this.moveTo(this.active + page),
      PageUp: () => this.moveTo(this.active - page),
      Home: () => this.moveTo(0),
      End: () => this.moveTo(this.names.length - 1),
      " ": () => {
        this.toggle(this.active);
        this.render();
      },
      Enter: () => {
        const name = this.names[this.active];
        if (name !== undefined && this.options.onOpen) this.options.onOpen(name);
      },
    };
    const action = keys[event.key];
    if (!action) return;
    event.preventDefault();
    action();
  }

  renderedRowCount() {
    return this.pool.length;
  }
}

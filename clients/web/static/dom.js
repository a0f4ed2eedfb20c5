// Building the page with DOM APIs only: text always goes in as text nodes
// (never innerHTML), so a VM arg holding "<script>" shows as text.

// h("button", {class: "x", onclick: fn, "aria-label": "..."}, "text", child…)
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "value" || key === "checked" || key === "disabled") {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

// "12.3" for a figure, "n/a" where the hypervisor does not report it (as ush).
export function figure(value, digits = 1) {
  return typeof value === "number" ? value.toFixed(digits) : "n/a";
}

export function mib(value) {
  if (typeof value !== "number") return "";
  return value >= 1024 ? `${(value / 1024).toFixed(value % 1024 ? 1 : 0)} GiB` : `${value} MiB`;
}

export function argsText(args) {
  if (!args || typeof args !== "object") return "";
  return Object.entries(args).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
}

export function plural(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

// The short name ("web1" of "web1.alice.usher.test").
export function shortName(name) {
  return String(name).split(".", 1)[0];
}

// A labelled control: the label names it by "for" (not by wrapping it, so
// the control's value never becomes part of its name); an optional hint is
// its description.
export function field(id, text, control, hint) {
  control.id = id;
  const parts = [h("label", { for: id }, text)];
  if (hint) {
    parts.push(h("span", { class: "hint", id: `${id}-hint` }, hint));
    control.setAttribute("aria-describedby", `${id}-hint`);
  }
  return h("div", { class: "field" }, ...parts, control);
}

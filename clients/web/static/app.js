// Usher's browser interface: the session, the live stream of VMs, and the
// hash routes of WEB_SPEC.md (#/login, #/vms, #/start, #/vm/NAME, #/lnms,
// #/lnm/NAME, #/admin/plugins, #/admin/problems). Plain ES modules.

import * as api from "./api.js";
import { h } from "./dom.js";
import { VmStream } from "./stream.js";
import * as loginPage from "./pages/login.js";
import * as vmsPage from "./pages/vms.js";
import * as vmPage from "./pages/vm.js";
import * as lnmsPage from "./pages/lnms.js";
import * as lnmPage from "./pages/lnm.js";
import * as pluginsPage from "./pages/plugins.js";
import * as problemsPage from "./pages/problems.js";

const ROUTES = [
  { pattern: /^login$/, page: loginPage, public: true },
  { pattern: /^vms$/, page: vmsPage },
  { pattern: /^start$/, page: vmsPage, params: () => ({ start: true }) },
  { pattern: /^vm\/(.+)$/, page: vmPage, params: (m) => ({ name: decodeURIComponent(m[1]) }) },
  { pattern: /^lnms$/, page: lnmsPage },
  { pattern: /^lnm\/(.+)$/, page: lnmPage, params: (m) => ({ name: decodeURIComponent(m[1]) }) },
  { pattern: /^admin\/plugins$/, page: pluginsPage, admin: true },
  { pattern: /^admin\/problems$/, page: problemsPage, admin: true },
];

const main = document.getElementById("main");
const statusRegion = document.getElementById("status");
const alertRegion = document.getElementById("alert");
const liveBadge = document.getElementById("live");

const app = {
  session: null,
  stream: new VmStream(),
  api,
  main,
  // A short message in the status bar (aria-live polite); keep=false clears it later.
  status(message, { busy = false, keep = false } = {}) {
    clearTimeout(this.statusTimer);
    statusRegion.replaceChildren(...(busy ? [h("span", { class: "spinner", "aria-hidden": "true" })] : []),
      message || "");
    if (message && !keep && !busy) this.statusTimer = setTimeout(() => statusRegion.replaceChildren(), 8000);
  },
  alert(message) {
    alertRegion.replaceChildren(...(message ? [h("div", {}, message)] : []));
    clearTimeout(this.alertTimer);
    if (message) this.alertTimer = setTimeout(() => alertRegion.replaceChildren(), 10000);
  },
  navigate(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },
  async loggedIn(session) {
    this.session = session;
    api.setCsrf(session.csrf);
    document.getElementById("user-name").textContent = `${session.user}${session.admin ? " (administrator)" : ""}`;
    document.getElementById("who").hidden = false;
    document.getElementById("nav").hidden = false;
    for (const item of document.querySelectorAll(".admin-only")) item.hidden = !session.admin;
    this.stream.stop();
    this.stream.start();
  },
  loggedOut() {
    this.session = null;
    api.setCsrf(null);
    this.stream.stop();
    document.getElementById("who").hidden = true;
    document.getElementById("nav").hidden = true;
    for (const item of document.querySelectorAll(".admin-only")) item.hidden = true;
  },
};

app.stream.subscribe((event) => {
  if (!event.connection) return;
  const { state, detail } = event.connection;
  const text = { live: "live", connecting: "connecting…", "controller-lost": "controller unreachable",
    closed: "reconnecting…" }[state] || state;
  liveBadge.textContent = text;
  liveBadge.title = detail || "";
  liveBadge.classList.toggle("is-bad", state !== "live");
});

let current = null;

async function route() {
  const hash = location.hash.replace(/^#\/?/, "") || "vms";
  const path = hash.split("?", 1)[0];
  let match = null;
  let entry = null;
  for (const candidate of ROUTES) {
    match = candidate.pattern.exec(path);
    if (match) {
      entry = candidate;
      break;
    }
  }
  if (!entry) {
    location.replace("#/vms");
    return;
  }
  if (!entry.public && !app.session) {
    location.replace("#/login");
    return;
  }
  if (current && current.cleanup) current.cleanup();
  current = null;
  main.replaceChildren();
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.route === path.split("/")[0] + (path.startsWith("admin/") ? `/${path.split("/")[1]}` : "")) {
      link.setAttribute("aria-current", "page");
    } else {
      link.removeAttribute("aria-current");
    }
  }
  if (entry.admin && !app.session.admin) {
    main.append(h("h1", {}, "Administrators only"),
      h("p", { class: "error" }, "This page is for administrators."));
    document.title = "Usher";
    return;
  }
  const params = entry.params ? entry.params(match) : {};
  try {
    const cleanup = entry.page.render(app, params);
    current = { cleanup: typeof cleanup === "function" ? cleanup : null };
  } catch (e) {
    console.error(e);
    main.append(h("p", { class: "error" }, `This page failed: ${e.message}`));
  }
  const heading = main.querySelector("h1");
  document.title = heading ? `${heading.textContent} — Usher` : "Usher";
}

window.addEventListener("hashchange", route);
// The controller's notices (a lease about to end, maintenance ...): a toast
// each, stacked, read out politely, gone after a while or when clicked; at
// most MAX_TOASTS shown (the oldest goes first). Issue 15, leases.
const MAX_TOASTS = 5;
const toastRegion = document.getElementById("toasts") || document.body.appendChild(
  h("div", { id: "toasts", class: "toasts", role: "status", "aria-live": "polite" }));
function toast(text) {
  const kind = /^([a-z0-9_.-]{1,32}): /.exec(text || "");
  const item = h("div", { class: `toast${kind ? ` toast-${kind[1].replace(/\./g, "-")}` : ""}`,
    title: "click to dismiss" }, text || "");
  item.addEventListener("click", () => item.remove());
  toastRegion.append(item);
  while (toastRegion.children.length > MAX_TOASTS) toastRegion.firstElementChild.remove();
  setTimeout(() => item.remove(), 20000);
}
window.addEventListener("usher:notice", (event) => toast(event.detail));
window.addEventListener("usher:logged-out", (event) => {
  if (!app.session) return;
  app.loggedOut();
  app.alert(`Your session has ended${event.detail ? ` (${event.detail})` : ""}: log in again.`);
  location.hash = "#/login";
});
document.getElementById("logout").addEventListener("click", async () => {
  try {
    await api.logout();
  } catch (e) {
    // Logged out on the server already: nothing more to do.
  }
  app.loggedOut();
  app.status("Logged out.");
  location.hash = "#/login";
});

async function boot() {
  try {
    await app.loggedIn(await api.session());
    if (!location.hash || location.hash === "#/login") {
      location.replace("#/vms");
      return;   // the hashchange routes
    }
  } catch (e) {
    if (!(e instanceof api.ApiError) || e.status !== 401) app.alert(e.message);
  }
  route();
}

boot();
window.usher = app;   // for the console and the browser tests (read only use)

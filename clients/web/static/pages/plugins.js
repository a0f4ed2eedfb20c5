// #/admin/plugins (administrators): the available plugins, the event chains,
// register, unregister and change a registration's order.
import { field, h } from "../dom.js";
import { confirmDialog } from "./vms.js";

function text(value) {
  return value === undefined || value === null ? "" : String(value);
}

export function render(app) {
  const error = h("p", { class: "error", role: "alert", hidden: true, id: "plugins-error" });
  const available = h("ul", { id: "plugins-available" });
  const chains = h("tbody", {});
  const name = h("select", { id: "register-name", required: true });
  const event = h("input", { id: "register-event", required: true, spellcheck: "false", placeholder: "e.g. start" });
  const config = h("input", { id: "register-config", spellcheck: "false", placeholder: "default" });
  const order = h("input", { id: "register-order", type: "number" });
  let stopped = false;

  function fail(e) {
    error.textContent = e.message;
    error.hidden = false;
  }

  async function act(label, call) {
    error.hidden = true;
    app.status(`${label}…`, { busy: true });
    try {
      await call();
      app.status(`${label}: done.`);
    } catch (e) {
      app.status("");
      fail(e);
    }
    await load();
  }

  function registrationRow(r) {
    const orderInput = h("input", { type: "number", value: text(r.order), class: "order-input",
      "aria-label": `order of ${r.plugin} on ${r.event}` });
    const setOrder = h("button", { type: "button", "aria-label": `set the order of ${r.plugin} on ${r.event}` },
      "Set order");
    setOrder.addEventListener("click", () => act(`Moving ${r.plugin} on ${r.event} to order ${orderInput.value}`, async () => {
      await app.api.unregisterPlugin({ name: r.plugin, event: r.event });
      const body = { name: r.plugin, event: r.event, order: Number(orderInput.value) };
      if (r.config) body.config_file = r.config;
      await app.api.registerPlugin(body);
    }));
    const remove = h("button", { type: "button", class: "danger",
      "aria-label": `unregister ${r.plugin} from ${r.event}` }, "Unregister");
    remove.addEventListener("click", async () => {
      if (await confirmDialog(`Unregister ${r.plugin} from ${r.event}?`, "Unregister")) {
        await act(`Unregistering ${r.plugin} from ${r.event}`, () => app.api.unregisterPlugin({ name: r.plugin, event: r.event }));
      }
    });
    return h("tr", { dataset: { plugin: text(r.plugin), event: text(r.event) } },
      h("td", {}, text(r.event)), h("td", {}, orderInput, " ", setOrder), h("td", {}, text(r.plugin)),
      h("td", {}, text(r.config)), h("td", {}, remove));
  }

  async function load() {
    try {
      const d = await app.api.plugins();
      if (stopped) return;
      const about = d.about || {};
      available.replaceChildren(...(d.available || []).map((p) => h("li", {}, h("strong", {}, p), about[p] ? ` — ${about[p]}` : "")));
      const chosen = name.value;
      name.replaceChildren(...(d.available || []).map((p) => h("option", { value: p }, p)));
      if (chosen) name.value = chosen;
      const registered = [...(d.registered || [])].sort((a, b) =>
        text(a.event).localeCompare(text(b.event)) || (a.order ?? 0) - (b.order ?? 0));
      chains.replaceChildren(...registered.map(registrationRow));
      if (!registered.length) chains.append(h("tr", {}, h("td", { colspan: "5" }, "No plugin is registered.")));
    } catch (e) {
      if (!stopped) fail(e);
    }
  }

  const form = h("form", { class: "stack", "aria-labelledby": "register-title" },
    field("register-name", "Plugin", name),
    field("register-event", "Event", event),
    field("register-config", "Configuration file (optional)", config),
    field("register-order", "Order (optional)", order),
    h("div", { class: "buttons" }, h("button", { type: "submit", class: "primary" }, "Register")));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const body = { name: name.value, event: event.value.trim() };
    if (config.value.trim()) body.config_file = config.value.trim();
    if (order.value !== "") body.order = Number(order.value);
    act(`Registering ${body.name} on ${body.event}`, () => app.api.registerPlugin(body));
  });

  app.main.append(h("h1", {}, "Plugins"), error,
    h("h2", {}, "Event chains (each runs from the lowest order up)"),
    h("div", { class: "scroll-x" }, h("table", { class: "plain", id: "plugin-chains" },
      h("thead", {}, h("tr", {}, ...["Event", "Order", "Plugin", "Configuration", ""].map((t) => h("th", { scope: "col" }, t)))),
      chains)),
    h("h2", { id: "register-title" }, "Register a plugin"), form,
    h("h2", {}, "Available plugins"), available);
  load();
  return () => {
    stopped = true;
  };
}

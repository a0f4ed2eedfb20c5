// #/login: the controller's authentication chain decides; its refusal is shown.
import { field, h } from "../dom.js";

export function render(app) {
  if (app.session) {
    app.navigate("#/vms");
    return null;
  }
  const error = h("p", { class: "error", id: "login-error", role: "alert", hidden: true });
  const user = h("input", { id: "login-user", name: "username", autocomplete: "username", required: true,
    autocapitalize: "none", spellcheck: "false" });
  const password = h("input", { id: "login-password", name: "password", type: "password",
    autocomplete: "current-password", required: true });
  const button = h("button", { type: "submit", class: "primary" }, "Log in");
  const form = h("form", { class: "stack", "aria-describedby": "login-error" },
    field("login-user", "User name", user),
    field("login-password", "Password", password),
    h("div", { class: "buttons" }, button), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    button.disabled = true;
    app.status("Logging in…", { busy: true });
    try {
      const session = await app.api.login(user.value.trim(), password.value);
      password.value = "";
      await app.loggedIn(session);
      app.status(`Logged in as ${session.user}.`);
      app.navigate("#/vms");
    } catch (e) {
      app.status("");
      error.textContent = e.message;
      error.hidden = false;
      password.value = "";
      password.focus();
    } finally {
      button.disabled = false;
    }
  });
  app.main.append(h("h1", {}, "Log in to Usher"), form);
  user.focus();
  return null;
}

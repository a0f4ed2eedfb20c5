// The REST API (/api/v1, WEB_SPEC.md): JSON in and out, the session's CSRF
// token on every state-changing request, errors as ApiError carrying the
// server's stable code and its message (the one ush prints).

const BASE = "/api/v1";
let csrfToken = null;

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function setCsrf(token) {
  csrfToken = token || null;
}

export async function request(method, path, body) {
  const headers = { Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (method !== "GET" && csrfToken) headers["X-CSRF-Token"] = csrfToken;
  let response;
  try {
    response = await fetch(BASE + path, init);
  } catch (e) {
    throw new ApiError(0, "unavailable", `cannot reach the web service (${e.message})`);
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    const failure = new ApiError(response.status, error.code || "internal",
      error.message || `the web service answered HTTP ${response.status}`);
    if (failure.code === "not_logged_in") window.dispatchEvent(new CustomEvent("usher:logged-out"));
    throw failure;
  }
  return data;
}

export const get = (path) => request("GET", path);
export const post = (path, body = {}) => request("POST", path, body);

export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

export const login = (username, password) => post("/login", { username, password });
export const logout = () => post("/logout");
export const session = () => get("/session");
export const vm = (name) => get(`/vms/${encodeURIComponent(name)}`);
export const lnms = () => get("/lnms?status=1");
export const lnm = (name) => get(`/lnms/${encodeURIComponent(name)}`);
export const start = (body) => post("/vms/start", body);
export const operate = (operation, names) => post(`/vms/${operation}`, { names });
export const migrate = (names, lnmNames) => post("/vms/migrate", { names, lnms: lnmNames });
export const plugins = () => get("/plugins");
export const registerPlugin = (body) => post("/plugins/register", body);
export const unregisterPlugin = (body) => post("/plugins/unregister", body);
export const problems = () => get("/problems");

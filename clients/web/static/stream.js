// The live map of the user's VMs, fed by the server's event stream
// (GET /api/v1/stream): a snapshot (one event, or parts then an end), then
// "changes" as the controller pushes them. No polling: a page subscribes and
// is told which names changed. EventSource reconnects by itself after a
// network error; a closed stream (the session ended) is retried with backoff
// once the session is confirmed, so a restarted daemon is followed too.

const URL = "/api/v1/stream";

export class VmStream {
  constructor() {
    this.vms = new Map();       // name -> record
    this.ready = false;          // a snapshot has arrived
    this.state = "connecting";   // connecting | live | controller-lost | closed
    this.detail = "";
    this.listeners = new Set();
    this.source = null;
    this.pending = null;
    this.retryDelay = 1000;
    this.stopped = true;
  }

  // listener({reset, changed: [names], removed: [names]}) or ({connection: {state, detail}});
  // the controller's notices go to window as "usher:notice" events.
  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  emit(event) {
    for (const listener of [...this.listeners]) {
      try {
        listener(event);
      } catch (e) {
        console.error("stream listener failed", e);
      }
    }
  }

  setState(state, detail = "") {
    this.state = state;
    this.detail = detail;
    this.emit({ connection: { state, detail } });
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    if (this.source) this.source.close();
    this.source = null;
    this.vms.clear();
    this.ready = false;
    clearTimeout(this.retryTimer);
  }

  open() {
    if (this.source) this.source.close();
    const source = new EventSource(URL);
    this.source = source;
    const parse = (handler) => (message) => {
      let data;
      try {
        data = JSON.parse(message.data);
      } catch {
        console.error("stream: an event that is not JSON", message.type);
        return;
      }
      handler(data);
    };
    source.addEventListener("open", () => {
      this.retryDelay = 1000;
      this.setState("live");
    });
    // The snapshot: "snapshot" (the first part), "snapshot-part"s, then
    // "snapshot-end"; the map is replaced at the end (so VMs removed while the
    // stream was down vanish), and changes follow.
    source.addEventListener("snapshot", parse((data) => {
      this.pending = [...(data.vms || [])];
    }));
    source.addEventListener("snapshot-part", parse((data) => {
      if (!this.pending) this.pending = [];
      for (const record of data.vms || []) this.pending.push(record);
    }));
    source.addEventListener("snapshot-end", parse(() => {
      const records = this.pending || [];
      this.pending = null;
      this.replace(records);
    }));
    source.addEventListener("changes", parse((data) => this.apply(data)));
    source.addEventListener("connection", parse((data) => {
      if (data.state === "notice") {
        window.dispatchEvent(new CustomEvent("usher:notice", { detail: data.detail || "" }));
        return;
      }
      const state = data.state === "connected" ? "live" : "controller-lost";
      this.setState(state, data.detail || data.state || "");
    }));
    source.addEventListener("session-ended", parse((data) => {
      this.stopped = true;
      source.close();
      window.dispatchEvent(new CustomEvent("usher:logged-out", { detail: data.reason || "" }));
    }));
    source.addEventListener("error", () => {
      if (this.stopped || source !== this.source) return;
      if (source.readyState === EventSource.CLOSED) {
        // The server ended the stream (logged out, expired, restarted).
        this.setState("closed", "the live view was interrupted; reconnecting");
        this.retryTimer = setTimeout(() => this.reopen(), this.retryDelay);
        this.retryDelay = Math.min(this.retryDelay * 2, 30000);
      } else {
        this.setState("connecting", "reconnecting to the live view");
      }
    });
  }

  async reopen() {
    if (this.stopped) return;
    try {
      const response = await fetch("/api/v1/session", { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        window.dispatchEvent(new CustomEvent("usher:logged-out"));
        return;
      }
    } catch {
      // The daemon is unreachable: try again later.
    }
    if (!this.stopped) this.open();
  }

  replace(records) {
    this.vms = new Map(records.map((record) => [record.name, record]));
    this.ready = true;
    this.emit({ reset: true, changed: [], removed: [] });
  }

  apply(data) {
    const changed = [];
    const removed = [];
    for (const record of data.changed || []) {
      this.vms.set(record.name, record);
      changed.push(record.name);
    }
    for (const name of data.removed || []) {
      if (this.vms.delete(name)) removed.push(name);
    }
    this.emit({ reset: false, changed, removed });
  }
}

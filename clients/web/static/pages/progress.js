// Progress of a request in flight (a 1,000-VM start, an operation on a
// selection, an evacuation): a spinner and how many VMs have got there so
// far, counted from the live stream (no polling), then the result summary.
import { plural } from "../dom.js";

// What a successful operation leaves a VM in (usher/states.py OPERATION_RESULT).
export const RESULT_STATE = {
  pause: "paused", resume: "run", shutdown: "shutoff", reboot: "run", hibernate: "hibernated",
  restore: "run", destroy: "shutoff", cycle: "run", delete: null, migrate: "run",
};

export const VERB = {
  pause: "Pausing", resume: "Resuming", shutdown: "Shutting down", reboot: "Rebooting",
  hibernate: "Hibernating", restore: "Restoring", destroy: "Destroying", cycle: "Cycling",
  delete: "Deleting",
  migrate: "Migrating", start: "Starting",
};

export const PAST = {
  pause: "paused", resume: "resumed", shutdown: "shut down", reboot: "rebooted",
  hibernate: "hibernated", restore: "restored", destroy: "destroyed", cycle: "cycled",
  delete: "deleted",
  migrate: "migrated", start: "started",
};

// reached(vms) -> how many of the request's VMs are where it takes them.
export function track(app, { label, total, reached }) {
  const update = () => {
    app.status(`${label}… ${reached(app.stream.vms)} of ${total} reached`, { busy: true });
  };
  update();
  const unsubscribe = app.stream.subscribe((event) => {
    if (!event.connection) update();
  });
  return () => unsubscribe();
}

function failureText(failed) {
  if (!failed || !failed.length) return "";
  const items = failed.map((item) => {
    if (Array.isArray(item)) return item.join(": ");
    if (item && typeof item === "object") {
      const name = item.name || item.vm || "";
      const message = item.message || item.error || item.reason || JSON.stringify(item);
      return name ? `${name}: ${message}` : message;
    }
    return String(item);
  });
  return `; failed: ${items.slice(0, 5).join("; ")}${items.length > 5 ? ` (and ${items.length - 5} more)` : ""}`;
}

export function summary(operation, result) {
  // The server's summary is the line ush prints; failures follow it.
  if (typeof result.summary === "string" && result.summary) {
    return result.summary + failureText(result.failed || []).replace(/^; failed/, ". Failed");
  }
  const done = result.started || result.done || result.migrated || [];
  const failed = result.failed || [];
  let text = `${PAST[operation] || operation} ${plural(done.length, "VM")}`;
  text += failureText(failed);
  if (typeof result.elapsed === "number") text += ` (${result.elapsed.toFixed(1)} s)`;
  for (const note of result.notes || []) text += `. ${note}`;
  return text;
}

// The operators' fleet page: nodes and instances, redrawn from each whole-fleet message of /ws/fleet/.
import { $, el, showNotice, showSessionEnded } from "./dom.js";
import { formatEta, formatSize } from "./warming.js";

const config = JSON.parse($("fleet-config").textContent);
const page = { socket: null, retryMs: 500, overview: null };

const mb = (value) => formatSize((value || 0) * 1e6);

function ago(seconds) {
  if (seconds == null) return "never";
  if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s ago`;
  return `${formatEta(seconds)} ago`;
}

function cell(row, ...children) {
  const td = el("td");
  for (const child of children) if (child != null) td.append(child);
  row.append(td);
  return td;
}

function badge(text, kind) {
  return el("span", `badge badge-${kind}`, text);
}

function sub(text) {
  return el("span", "sub", text);
}

function emptyRow(body, columns, text) {
  const row = el("tr", "empty");
  const td = el("td", "", text);
  td.colSpan = columns;
  row.append(td);
  body.replaceChildren(row);
}

function renderNodes(nodes) {
  const body = $("node-rows");
  $("nodes-count").textContent = `(${nodes.filter((n) => n.online).length} online of ${nodes.length})`;
  if (!nodes.length) {
    emptyRow(body, 7, "No node has registered yet. Start a node agent (manage.py node_worker).");
    return;
  }
  body.replaceChildren(...nodes.map((node) => {
    const row = el("tr");
    row.dataset.node = node.name;
    row.dataset.status = node.status;
    cell(row, el("strong", "", node.name), sub(`${node.address}${node.hostname ? ` · ${node.hostname}` : ""}`));
    cell(row, badge(node.status, node.status));
    cell(row, ago(node.heartbeat_age_s));
    cell(row, `${mb(node.memory_free_mb)} of ${mb(node.memory_total_mb)}`);
    cell(row, ...node.gpus.map((gpu) => {
      const device = node.has_gpu ? `GPU ${gpu.index}${gpu.name ? ` ${gpu.name}` : ""}` : "CPU budget";
      return el("span", "device", `${device}: ${mb(gpu.free_mb)} free of ${mb(gpu.total_mb)}`);
    }));
    cell(row, mb(node.disk_free_mb));
    const disk = el("span", "disk-list");
    disk.append(...node.models_on_disk.map((id) => el("span", "cap", id)));
    cell(row, node.models_on_disk.length ? disk : sub("none"));
    return row;
  }));
}

function progress(instance) {
  const box = el("div", "progress");
  if (instance.public_phase === "downloading") {
    const parts = instance.total_mb
      ? [`${mb(instance.done_mb)} of ${mb(instance.total_mb)}`, `${Number(instance.pct).toFixed(1)}%`]
      : ["starting the download"];
    if (instance.rate_mbps > 0) parts.push(`${instance.rate_mbps} MB/s`);
    if (instance.eta_s != null) parts.push(`~${formatEta(instance.eta_s)} left`);
    box.append(sub(parts.join(" · ")));
    const bar = el("div", "bar");
    const fill = el("div", "bar-fill");
    fill.style.width = `${Math.min(100, Math.max(0, instance.pct || 0))}%`;
    bar.append(fill);
    box.append(bar);
  } else if (instance.public_phase === "ready" && instance.load_seconds != null) {
    box.append(sub(`loaded in ${instance.load_seconds.toFixed(1)} s`));
  } else if (instance.phase === "failed") {
    box.append(el("span", "error-text", (instance.error || "unknown error").split("\n").filter(Boolean)[0] || "unknown error"));
  } else {
    box.append(sub("—"));
  }
  return box;
}

function renderInstances(instances, windowS) {
  const body = $("instance-rows");
  $("demand-head").textContent = `Demand (${Math.round(windowS / 60)} min)`;
  $("instances-count").textContent = `(${instances.filter((i) => i.public_phase === "ready").length} ready of ${instances.length})`;
  if (!instances.length) {
    emptyRow(body, 7, "No model is loaded. A request for any offered model places one.");
    return;
  }
  body.replaceChildren(...instances.map((instance) => {
    const row = el("tr");
    row.dataset.instance = String(instance.id);
    row.dataset.model = instance.model;
    row.dataset.phase = instance.public_phase;
    row.dataset.rawPhase = instance.phase;
    row.dataset.pct = String(instance.pct);
    cell(row, el("strong", "", instance.display_name || instance.model),
      sub(`${instance.model}${instance.replica ? ` · replica ${instance.replica}` : ""}`));
    cell(row, instance.node);
    // The raw phase says more than the public one here (draining, unloading): operators see both.
    const label = instance.phase === instance.public_phase ? instance.label.text : instance.phase;
    cell(row, badge(label, instance.label.kind));
    cell(row, progress(instance));
    cell(row, el("span", "inflight", `${instance.inflight}`), sub(`of ${instance.slots} at once`));
    cell(row, `${instance.demand}`, sub(`${instance.requests} ${instance.requests === 1 ? "request" : "requests"}`));
    cell(row, mb(instance.vram_mb));
    return row;
  }));
}

function render(overview) {
  page.overview = overview;
  renderNodes(overview.nodes);
  renderInstances(overview.instances, overview.demand_window_s);
}

function setLive(state, text) {
  const live = $("live");
  live.dataset.state = state;
  live.textContent = text;
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}${config.urls.socket}`);
  page.socket = socket;
  socket.addEventListener("open", () => {
    page.retryMs = 500;
    setLive("live", "live");
  });
  socket.addEventListener("message", (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (message.type === "fleet") render(message);
  });
  socket.addEventListener("close", (event) => {
    page.socket = null;
    if (event.code === 4401) {
      setLive("down", "signed out");
      showSessionEnded();
      return;
    }
    if (event.code === 4403) {
      setLive("down", "not allowed");
      showNotice("The fleet page is for staff; this account is not.", "Sign in as staff", `/admin/login/?next=${encodeURIComponent(location.pathname)}`);
      return;
    }
    // Dropped (a hub restart, a network blip): the tables stay as they were, marked stale, until it is back.
    setLive("down", "reconnecting…");
    setTimeout(connect, page.retryMs);
    page.retryMs = Math.min(page.retryMs * 2, 10000);
  });
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && page.socket && page.socket.readyState === WebSocket.OPEN) {
    page.socket.send(JSON.stringify({ type: "refresh" }));
  }
});

render(config.overview);
connect();

// For tests and the curious.
window.PortenFleet = page;

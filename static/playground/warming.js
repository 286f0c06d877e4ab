// Each model's warming state (socket pushes first, polling when they are quiet or gone), prewarm, and the bar.
import { $, showSessionEnded } from "./dom.js";
import { describeError, jsonHeaders, readError } from "./http.js";
import { paintBadge, renderHeader } from "./picker.js";

const WARMING = new Set(["queued", "downloading", "loading"]);
// Within one load, states only move forward; an older one (a poll crossing a push) is dropped.
const PHASE_RANK = { queued: 1, downloading: 2, loading: 3, ready: 4, failed: 5, idle: 5 };
const STALE_MS = 2000;         // no push for this long while warming: ask the server (half that with no socket)
const OTHERS_POLL_MS = 3000;   // warming models other than the picked one

export function formatSize(bytes) {
  const mb = bytes / 1e6;
  return mb >= 1000 ? `${(mb / 1000).toFixed(1)} GB` : `${Math.round(mb)} MB`;
}

export function formatEta(seconds) {
  if (seconds < 60) return `${Math.max(1, Math.ceil(seconds))} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

export function applyState(app, state, options = {}) {
  if (!state || !state.model) return;
  const previous = app.states.get(state.model);
  if (previous && previous.instance != null && previous.instance === state.instance) {
    const older = (PHASE_RANK[state.phase] || 0) < (PHASE_RANK[previous.phase] || 0);
    const behind = state.phase === previous.phase && state.phase === "downloading" &&
      (state.bytes_done || 0) < (previous.bytes_done || 0);
    if (older || behind) return;
  }
  app.states.set(state.model, state);
  if (state.model === app.selected) app.lastUpdateAt = Date.now();
  if (options.quiet) return;
  const row = app.rows.get(state.model);
  if (row) paintBadge(app, row.badge, state);
  if (state.model === app.selected) {
    renderHeader(app);
    renderBar(app);
  }
}

export async function pollState(app, modelId) {
  if (app.polling.has(modelId)) return;
  app.polling.add(modelId);
  try {
    const response = await fetch(`${app.config.urls.warming}?model=${encodeURIComponent(modelId)}`, { credentials: "same-origin" });
    if (response.ok) applyState(app, await response.json());
  } catch (_) {
    // Offline for a moment: the watchdog asks again.
  } finally {
    app.polling.delete(modelId);
  }
}

export function closeSocket(app) {
  const socket = app.socket;
  app.socket = null;
  if (socket) socket.close(1000);
}

// onModelGone is the catalog's refresh, passed in because the catalog module imports this one.
export function openSocket(app, modelId, onModelGone) {
  closeSocket(app);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}${app.config.urls.socket}${encodeURIComponent(modelId)}/`);
  app.socket = socket;
  socket.addEventListener("open", () => { app.socketRetryMs = 500; });
  socket.addEventListener("message", (event) => {
    let state;
    try {
      state = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (state.model === modelId) applyState(app, state);
  });
  socket.addEventListener("close", (event) => {
    if (app.socket !== socket) return;  // we closed it ourselves
    app.socket = null;
    if (event.code === 4401) {
      showSessionEnded();
      return;
    }
    if (event.code === 4404) {
      onModelGone();
      return;
    }
    // Dropped: catch up by polling now, then reconnect with a growing pause.
    pollState(app, modelId);
    setTimeout(() => {
      if (app.selected === modelId && !app.socket) openSocket(app, modelId, onModelGone);
    }, app.socketRetryMs);
    app.socketRetryMs = Math.min(app.socketRetryMs * 2, 10000);
  });
}

export function watchdog(app) {
  const now = Date.now();
  const selectedState = app.selected ? app.states.get(app.selected) : null;
  const moving = selectedState && WARMING.has(selectedState.phase);
  // Pushes are best effort: a bar never stays frozen while the load moves on.
  const socketUp = app.socket && app.socket.readyState === WebSocket.OPEN;
  const staleMs = socketUp ? STALE_MS : STALE_MS / 2;
  if (app.selected && (moving || app.waiting) && now - app.lastUpdateAt > staleMs) pollState(app, app.selected);
  if (now - app.othersPolledAt > OTHERS_POLL_MS) {
    app.othersPolledAt = now;
    for (const [modelId, state] of app.states) {
      if (modelId !== app.selected && WARMING.has(state.phase) && app.models.has(modelId)) pollState(app, modelId);
    }
  }
}

export async function prewarm(app, modelId) {
  try {
    const response = await fetch(app.config.urls.prewarm, {
      method: "POST", credentials: "same-origin", headers: jsonHeaders(app.config), body: JSON.stringify({ model: modelId }),
    });
    if (response.ok) {
      applyState(app, await response.json());
      return;
    }
    const error = await readError(response);
    if (error.code === "prewarm_disabled") return;
    if (modelId === app.selected) showBarError(app, error);
  } catch (error) {
    if (modelId === app.selected) showBarError(app, error);
  }
}

function showBarError(app, error) {
  app.barError = error;
  renderBar(app);
}

function canRetry(app) {
  const failed = app.lastFailedPrompt;
  return Boolean(app.config.prewarmOnPick || (failed && failed.model === app.selected));
}

export function renderBar(app) {
  const bar = $("warming");
  const label = $("warming-label");
  const fill = $("warming-fill");
  const failed = $("warming-failed");
  const state = app.selected ? app.states.get(app.selected) : null;
  const phase = state ? state.phase : "idle";
  const show = (text, pct, mode) => {
    bar.hidden = false;
    bar.dataset.phase = mode;
    bar.dataset.pct = pct == null ? "" : String(pct);
    bar.classList.toggle("indeterminate", pct == null);
    bar.classList.toggle("is-failed", mode === "failed" || mode === "error");
    label.textContent = text;
    fill.style.width = pct == null ? "" : `${Math.min(100, Math.max(0, pct))}%`;
    failed.hidden = !(mode === "failed" || mode === "error");
    $("warming-retry").hidden = !canRetry(app);
  };
  if (!app.selected) {
    bar.hidden = true;
    return;
  }
  if (phase === "failed") {
    const reason = (state.error || "unknown error").split("\n").filter(Boolean)[0] || "unknown error";
    $("warming-reason").textContent = `Loading ${app.selected} failed: ${reason}`;
    show("Load failed", 100, "failed");
    return;
  }
  if (app.barError && !WARMING.has(phase) && phase !== "ready") {
    const { words, detail } = describeError(app.barError);
    $("warming-reason").textContent = `${words} ${detail}`;
    show("Could not start loading", 100, "error");
    return;
  }
  if (phase === "queued") {
    show("Waiting for a machine to start loading…", null, "queued");
  } else if (phase === "downloading") {
    const done = state.bytes_done || 0;
    const total = state.bytes_total || 0;
    if (total) {
      const parts = [`Downloading ${formatSize(done)} of ${formatSize(total)}`, `${Number(state.pct || 0).toFixed(1)}%`];
      if (state.rate_mbps > 0) parts.push(`${state.rate_mbps >= 10 ? Math.round(state.rate_mbps) : state.rate_mbps} MB/s`);
      if (state.eta_s != null) parts.push(`~${formatEta(state.eta_s)} left`);
      show(parts.join(" · "), state.pct || 0, "downloading");
    } else {
      show("Starting the download…", null, "downloading");
    }
  } else if (phase === "loading") {
    show("Loading into memory…", null, "loading");
  } else if (app.waiting && app.barShownForRequest) {
    // The model just became ready: the bar goes once the first token is here.
    show(phase === "ready" ? "Ready · waiting for the first words…" : "Starting…", phase === "ready" ? 100 : null, phase);
  } else {
    bar.hidden = true;
    bar.dataset.phase = phase;
    return;
  }
  if (app.waiting) app.barShownForRequest = true;
}

// Which models are offered (the page's catalog, then /v1/models) and which one is picked.
import { $, showNotice, showSessionEnded } from "./dom.js";
import { renderHeader, renderPicker } from "./picker.js";
import { applyState, closeSocket, openSocket, prewarm, renderBar } from "./warming.js";

export function renderCatalog(app) {
  renderPicker(app, (modelId) => selectModel(app, modelId));
}

export function loadCatalog(app, entries) {
  const known = new Map();
  for (const entry of entries) {
    known.set(entry.id, {
      id: entry.id, display_name: entry.display_name, description: entry.description || "",
      context_length: entry.context_length, capabilities: entry.capabilities || [],
    });
    if (entry.state) applyState(app, entry.state, { quiet: true });
    const current = app.states.get(entry.id);
    // /v1/models knows readiness; warming details come from the socket and the warming endpoint.
    if (entry.ready === true && (!current || current.phase !== "ready")) {
      app.states.set(entry.id, { model: entry.id, ready: true, phase: "ready", pct: 100, instance: current ? current.instance : null });
    } else if (entry.ready === false && current && current.phase === "ready") {
      app.states.set(entry.id, { model: entry.id, ready: false, phase: "idle", pct: 0, instance: null });
    }
  }
  app.models = known;
  renderCatalog(app);
  if (app.selected && !known.has(app.selected)) {
    showNotice(`${app.selected} is not offered any more; pick another model.`);
    selectModel(app, null);
  }
  renderHeader(app);
  renderBar(app);
}

export async function refreshCatalog(app) {
  try {
    const response = await fetch(app.config.urls.models, { credentials: "same-origin" });
    if (response.status === 401 || response.status === 403) {
      showSessionEnded();
      return;
    }
    if (!response.ok) return;
    const body = await response.json();
    loadCatalog(app, body.data || []);
  } catch (_) {
    // The next tick tries again; the picker keeps what it knew.
  }
}

export function selectModel(app, modelId) {
  if (modelId === app.selected) return;
  app.selected = modelId;
  app.barError = null;
  app.lastUpdateAt = Date.now();
  for (const [id, row] of app.rows) row.item.setAttribute("aria-pressed", String(id === modelId));
  renderHeader(app);
  renderBar(app);
  if (!modelId) {
    closeSocket(app);
    return;
  }
  openSocket(app, modelId, () => refreshCatalog(app));
  const state = app.states.get(modelId);
  const phase = state ? state.phase : "idle";
  if (app.config.prewarmOnPick && (phase === "idle" || phase === "failed")) prewarm(app, modelId);
  $("prompt").focus();
}

// The model list and the chat header: names, context, capabilities, and a badge for each warming phase.
import { $, el } from "./dom.js";

// The labels come from the server (config.phaseLabels), so the page and the server-rendered list agree.
export function stateLabel(phaseLabels, state) {
  const phase = state ? state.phase : "idle";
  const label = Object.hasOwn(phaseLabels, phase) ? phaseLabels[phase] : phaseLabels.idle;
  return { text: label.text.replaceAll("{pct}", String(Math.floor((state && state.pct) || 0))), kind: label.kind };
}

export function paintBadge(app, badge, state) {
  const { text, kind } = stateLabel(app.config.phaseLabels, state);
  badge.textContent = text;
  badge.className = `badge badge-${kind}`;
}

export function renderPicker(app, onPick) {
  const list = $("model-list");
  const filter = $("model-filter").value.trim().toLowerCase();
  list.replaceChildren();
  app.rows.clear();
  if (app.models.size === 0) {
    list.append(el("li", "empty", "No model is offered yet. An operator adds models in the admin."));
    return;
  }
  for (const model of app.models.values()) {
    const haystack = `${model.id} ${model.display_name} ${(model.capabilities || []).join(" ")}`.toLowerCase();
    if (filter && !haystack.includes(filter)) continue;
    const item = el("button", "model-item");
    item.type = "button";
    item.dataset.modelId = model.id;
    item.setAttribute("aria-pressed", String(model.id === app.selected));
    if (model.description) item.title = model.description;
    const row = el("span", "model-row");
    const badge = el("span", "badge");
    paintBadge(app, badge, app.states.get(model.id));
    row.append(el("span", "model-name", model.display_name || model.id), badge);
    const meta = el("span", "model-meta");
    meta.append(el("span", "", `${Number(model.context_length).toLocaleString("en")} tokens`));
    for (const capability of model.capabilities || []) meta.append(el("span", "cap", capability));
    item.append(row, el("span", "model-id", model.id), meta);
    item.addEventListener("click", () => onPick(model.id));
    const li = el("li");
    li.append(item);
    list.append(li);
    app.rows.set(model.id, { item, badge });
  }
}

export function renderHeader(app) {
  const model = app.selected ? app.models.get(app.selected) : null;
  const info = $("model-info");
  if (!model) {
    $("model-title").textContent = "Pick a model";
    info.textContent = "Every model in the catalog answers here, loaded or not.";
    return;
  }
  $("model-title").textContent = model.display_name || model.id;
  info.replaceChildren();
  const badge = el("span", "badge");
  paintBadge(app, badge, app.states.get(model.id));
  info.append(el("code", "", model.id), badge,
    el("span", "", `context ${Number(model.context_length).toLocaleString("en")} tokens`));
  for (const capability of model.capabilities || []) info.append(el("span", "cap", capability));
  $("max-tokens").max = String(model.context_length);
}

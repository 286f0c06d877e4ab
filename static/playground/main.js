// The playground's entry (model picker, live warming bar, streamed chat; no build step): state, events, timers.
import { $ } from "./dom.js";
import { loadCatalog, refreshCatalog, renderCatalog } from "./catalog.js";
import { clearChat, retryLoad, send, stopAnswer } from "./chat.js";
import { escapeHtml, renderMarkdown } from "./markdown.js";
import { formatEta, formatSize, watchdog } from "./warming.js";

const CATALOG_POLL_MS = 20000;

const config = JSON.parse($("playground-config").textContent);

// The page's one piece of shared state: every module gets it as an argument and keeps none of its own.
const app = {
  config,                 // #playground-config: urls, catalog, phaseLabels, prewarmOnPick, warmupBudgetS, csrfToken
  models: new Map(),      // id -> {id, display_name, description, context_length, capabilities}
  states: new Map(),      // id -> latest warming state
  rows: new Map(),        // id -> {item, badge}
  selected: null,
  history: [],            // [{role, content}] sent with every request
  controller: null,       // AbortController of the request in flight
  waiting: false,         // a request is out and no token has come back yet
  barShownForRequest: false,
  barError: null,         // why the picked model could not start loading (prewarm refused or unreachable)
  lastFailedPrompt: null,
  socket: null,
  socketRetryMs: 500,
  lastUpdateAt: 0,
  polling: new Set(),
  othersPolledAt: 0,
};

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || app.controller) return;
  $("prompt").value = "";
  send(app, text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => stopAnswer(app));
$("clear").addEventListener("click", () => clearChat(app));
$("warming-retry").addEventListener("click", () => retryLoad(app));
$("model-filter").addEventListener("input", () => renderCatalog(app));
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && app.socket && app.socket.readyState === WebSocket.OPEN) {
    app.socket.send(JSON.stringify({ type: "refresh" }));
  }
});

loadCatalog(app, config.catalog || []);
refreshCatalog(app);
setInterval(() => watchdog(app), 500);
setInterval(() => refreshCatalog(app), CATALOG_POLL_MS);

// For tests and the curious: the pure parts of the page.
window.PortenPlayground = { renderMarkdown, escapeHtml, formatSize, formatEta, state: app };

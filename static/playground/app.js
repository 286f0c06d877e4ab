// Porten playground: model picker, live warming bar, streamed chat. Vanilla JS, no build step.
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("playground-config").textContent);
  const $ = (id) => document.getElementById(id);

  const WARMING = new Set(["queued", "downloading", "loading"]);
  // Within one load, states only move forward; an older one (a poll crossing a push) is dropped.
  const PHASE_RANK = { queued: 1, downloading: 2, loading: 3, ready: 4, failed: 5, idle: 5 };
  const STALE_MS = 2000;         // no push for this long while warming: ask the server (half that with no socket)
  const OTHERS_POLL_MS = 3000;   // warming models other than the picked one
  const CATALOG_POLL_MS = 20000;
  const MAX_RETRY_WAIT_S = 5;

  const ERROR_WORDS = {
    model_warming: "The model is still warming up.",
    model_load_failed: "The model could not be loaded on its machine.",
    no_capacity: "No machine in the fleet has room for this model, even after unloading others.",
    fleet_busy: "The fleet is busy placing another model. Try again in a few seconds.",
    model_not_found: "This model is not offered any more. Pick another one.",
    engine_unavailable: "The model's engine stopped answering. Try again.",
    csrf_failed: "This page's security token is stale. Reload the page.",
    invalid_api_key: "You are signed out. Sign in again.",
    not_authenticated: "You are signed out. Sign in again.",
    request_too_large: "The conversation is too long to send. Clear it and start again.",
    prewarm_disabled: "Warming on pick is turned off; the model loads with your first message.",
    network: "Could not reach Porten. Check the connection and try again.",
  };

  const app = {
    models: new Map(),      // id -> {id, display_name, description, context_length, capabilities}
    states: new Map(),      // id -> latest warming state
    rows: new Map(),        // id -> {item, badge}
    selected: null,
    history: [],            // [{role, content}] sent with every request
    controller: null,       // AbortController of the request in flight
    waiting: false,         // a request is out and no token has come back yet
    barShownForRequest: false,
    lastFailedPrompt: null,
    socket: null,
    socketRetryMs: 500,
    lastUpdateAt: 0,
    polling: new Set(),
    othersPolledAt: 0,
  };

  // --- small helpers ----------------------------------------------------------------------

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      if (signal) {
        signal.addEventListener("abort", () => {
          clearTimeout(timer);
          reject(new DOMException("Aborted", "AbortError"));
        }, { once: true });
      }
    });
  }

  function formatSize(bytes) {
    const mb = bytes / 1e6;
    return mb >= 1000 ? `${(mb / 1000).toFixed(1)} GB` : `${Math.round(mb)} MB`;
  }

  function formatEta(seconds) {
    if (seconds < 60) return `${Math.max(1, Math.ceil(seconds))} s`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
    return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  }

  function csrfToken() {
    // The cookie is the freshest copy (signing in again in another tab rotates it).
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : config.csrfToken;
  }

  function jsonHeaders() {
    return { "Content-Type": "application/json", "X-CSRFToken": csrfToken() };
  }

  class ApiError extends Error {
    constructor(status, error) {
      super((error && error.message) || `HTTP ${status}`);
      this.status = status;
      this.code = (error && error.code) || null;
      this.detail = error || {};
    }
  }

  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    const error = body && body.error ? body.error : { message: `The server answered HTTP ${response.status}.`, code: null };
    return new ApiError(response.status, error);
  }

  function describeError(error) {
    if (error instanceof ApiError) {
      let words = ERROR_WORDS[error.code];
      if (!words) {
        if (error.status === 400) words = "The request was not accepted.";
        else if (error.status === 401 || error.status === 403) words = "You are not allowed to do this; try signing in again.";
        else if (error.status >= 500) words = "The server had a problem answering.";
        else words = "The request failed.";
      }
      const code = error.code ? `code ${error.code}, ` : "";
      return { words, detail: `${error.message} (${code}HTTP ${error.status})` };
    }
    return { words: ERROR_WORDS.network, detail: String(error && error.message ? error.message : error) };
  }

  function showNotice(text, linkText, href) {
    const notice = $("notice");
    notice.textContent = text;
    if (linkText) {
      notice.append(" ");
      const link = el("a", "", linkText);
      link.href = href;
      notice.append(link);
    }
    notice.hidden = false;
  }

  // --- Markdown: escape everything first, then add the few tags we make ourselves ---------------

  function inline(text) {
    // Code spans first, so their content is never formatted; odd parts are the spans.
    return text.split(/(`[^`\n]+`)/).map((part, index) => {
      if (index % 2) return `<code>${escapeHtml(part.slice(1, -1))}</code>`;
      return escapeHtml(part)
        .replace(/\*\*(\S(?:[^*]*\S)?)\*\*/g, "<strong>$1</strong>")
        .replace(/__(\S(?:[^_]*\S)?)__/g, "<strong>$1</strong>")
        .replace(/(^|[^*\w])\*(\S(?:[^*]*\S)?)\*(?!\*)/g, "$1<em>$2</em>");
    }).join("");
  }

  function renderMarkdown(source) {
    const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
    let html = "";
    let paragraph = [];
    let list = null;
    const flushParagraph = () => {
      if (paragraph.length) html += `<p>${paragraph.map(inline).join("<br>")}</p>`;
      paragraph = [];
    };
    const flushList = () => {
      if (list) html += `<${list.type}>${list.items.map((item) => `<li>${inline(item)}</li>`).join("")}</${list.type}>`;
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flushParagraph();
        flushList();
        const code = [];
        // A fence still open while tokens stream in runs to the end of the text.
        for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
        const lang = fence[1] ? ` data-lang="${escapeHtml(fence[1])}"` : "";
        html += `<pre class="code"${lang}><code>${escapeHtml(code.join("\n"))}</code></pre>`;
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (heading) {
        flushParagraph();
        flushList();
        const level = Math.min(heading[1].length + 2, 6);
        html += `<h${level}>${inline(heading[2])}</h${level}>`;
      } else if (bullet || numbered) {
        flushParagraph();
        const type = bullet ? "ul" : "ol";
        if (!list || list.type !== type) {
          flushList();
          list = { type, items: [] };
        }
        list.items.push((bullet || numbered)[1]);
      } else if (/^\s*$/.test(line)) {
        flushParagraph();
        flushList();
      } else {
        flushList();
        paragraph.push(line);
      }
    }
    flushParagraph();
    flushList();
    return html;
  }

  // --- the picker -------------------------------------------------------------------------

  function stateLabel(state) {
    const phase = state ? state.phase : "idle";
    if (phase === "ready") return ["ready", "ready"];
    if (phase === "downloading") return [`warming ${Math.floor(state.pct || 0)}%`, "warming"];
    if (phase === "queued") return ["warming", "warming"];
    if (phase === "loading") return ["loading", "warming"];
    if (phase === "failed") return ["failed", "failed"];
    return ["cold", "cold"];
  }

  function paintBadge(badge, state) {
    const [text, kind] = stateLabel(state);
    badge.textContent = text;
    badge.className = `badge badge-${kind}`;
  }

  function renderPicker() {
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
      paintBadge(badge, app.states.get(model.id));
      row.append(el("span", "model-name", model.display_name || model.id), badge);
      const meta = el("span", "model-meta");
      meta.append(el("span", "", `${Number(model.context_length).toLocaleString("en")} tokens`));
      for (const capability of model.capabilities || []) meta.append(el("span", "cap", capability));
      item.append(row, el("span", "model-id", model.id), meta);
      item.addEventListener("click", () => selectModel(model.id));
      const li = el("li");
      li.append(item);
      list.append(li);
      app.rows.set(model.id, { item, badge });
    }
  }

  function loadCatalog(entries) {
    const known = new Map();
    for (const entry of entries) {
      known.set(entry.id, {
        id: entry.id, display_name: entry.display_name, description: entry.description || "",
        context_length: entry.context_length, capabilities: entry.capabilities || [],
      });
      if (entry.state) applyState(entry.state, { quiet: true });
      const current = app.states.get(entry.id);
      // /v1/models knows readiness; warming details come from the socket and the warming endpoint.
      if (entry.ready === true && (!current || current.phase !== "ready")) {
        app.states.set(entry.id, { model: entry.id, ready: true, phase: "ready", pct: 100, instance: current ? current.instance : null });
      } else if (entry.ready === false && current && current.phase === "ready") {
        app.states.set(entry.id, { model: entry.id, ready: false, phase: "idle", pct: 0, instance: null });
      }
    }
    app.models = known;
    renderPicker();
    if (app.selected && !known.has(app.selected)) {
      showNotice(`${app.selected} is not offered any more; pick another model.`);
      selectModel(null);
    }
    renderHeader();
    renderBar();
  }

  async function refreshCatalog() {
    try {
      const response = await fetch(config.urls.models, { credentials: "same-origin" });
      if (response.status === 401 || response.status === 403) {
        showNotice("Your session has ended.", "Sign in again", `/admin/login/?next=${encodeURIComponent(location.pathname)}`);
        return;
      }
      if (!response.ok) return;
      const body = await response.json();
      loadCatalog(body.data || []);
    } catch (_) {
      // The next tick tries again; the picker keeps what it knew.
    }
  }

  // --- warming state: socket first, polling when it is quiet or gone --------------------------

  function applyState(state, options = {}) {
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
    if (row) paintBadge(row.badge, state);
    if (state.model === app.selected) {
      renderHeader();
      renderBar();
    }
  }

  async function pollState(modelId) {
    if (app.polling.has(modelId)) return;
    app.polling.add(modelId);
    try {
      const response = await fetch(`${config.urls.warming}?model=${encodeURIComponent(modelId)}`, { credentials: "same-origin" });
      if (response.ok) applyState(await response.json());
    } catch (_) {
      // Offline for a moment: the watchdog asks again.
    } finally {
      app.polling.delete(modelId);
    }
  }

  function closeSocket() {
    const socket = app.socket;
    app.socket = null;
    if (socket) socket.close(1000);
  }

  function openSocket(modelId) {
    closeSocket();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}${config.urls.socket}${encodeURIComponent(modelId)}/`);
    app.socket = socket;
    socket.addEventListener("open", () => { app.socketRetryMs = 500; });
    socket.addEventListener("message", (event) => {
      let state;
      try {
        state = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      if (state.model === modelId) applyState(state);
    });
    socket.addEventListener("close", (event) => {
      if (app.socket !== socket) return;  // we closed it ourselves
      app.socket = null;
      if (event.code === 4401) {
        showNotice("Your session has ended.", "Sign in again", `/admin/login/?next=${encodeURIComponent(location.pathname)}`);
        return;
      }
      if (event.code === 4404) {
        refreshCatalog();
        return;
      }
      // Dropped: catch up by polling now, then reconnect with a growing pause.
      pollState(modelId);
      setTimeout(() => {
        if (app.selected === modelId && !app.socket) openSocket(modelId);
      }, app.socketRetryMs);
      app.socketRetryMs = Math.min(app.socketRetryMs * 2, 10000);
    });
  }

  function watchdog() {
    const now = Date.now();
    const selectedState = app.selected ? app.states.get(app.selected) : null;
    const moving = selectedState && WARMING.has(selectedState.phase);
    // Pushes are best effort: a bar never stays frozen while the load moves on.
    const socketUp = app.socket && app.socket.readyState === WebSocket.OPEN;
    const staleMs = socketUp ? STALE_MS : STALE_MS / 2;
    if (app.selected && (moving || app.waiting) && now - app.lastUpdateAt > staleMs) pollState(app.selected);
    if (now - app.othersPolledAt > OTHERS_POLL_MS) {
      app.othersPolledAt = now;
      for (const [modelId, state] of app.states) {
        if (modelId !== app.selected && WARMING.has(state.phase) && app.models.has(modelId)) pollState(modelId);
      }
    }
  }

  async function prewarm(modelId) {
    try {
      const response = await fetch(config.urls.prewarm, {
        method: "POST", credentials: "same-origin", headers: jsonHeaders(), body: JSON.stringify({ model: modelId }),
      });
      if (response.ok) {
        applyState(await response.json());
        return;
      }
      const error = await readError(response);
      if (error.code === "prewarm_disabled") return;
      if (modelId === app.selected) showBarError(error);
    } catch (error) {
      if (modelId === app.selected) showBarError(error);
    }
  }

  // --- the header and the bar ------------------------------------------------------------------

  function renderHeader() {
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
    paintBadge(badge, app.states.get(model.id));
    info.append(el("code", "", model.id), badge,
      el("span", "", `context ${Number(model.context_length).toLocaleString("en")} tokens`));
    for (const capability of model.capabilities || []) info.append(el("span", "cap", capability));
    $("max-tokens").max = String(model.context_length);
  }

  let barError = null;

  function showBarError(error) {
    barError = error;
    renderBar();
  }

  function renderBar() {
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
      $("warming-retry").hidden = !canRetry();
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
    if (barError && !WARMING.has(phase) && phase !== "ready") {
      const { words, detail } = describeError(barError);
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

  // --- chat -----------------------------------------------------------------------------------

  function scrollToEnd(force) {
    const history = $("history");
    const nearEnd = history.scrollHeight - history.scrollTop - history.clientHeight < 80;
    if (force || nearEnd) history.scrollTop = history.scrollHeight;
  }

  function addMessage(role, text) {
    $("hint").hidden = true;
    const message = el("div", `message ${role}`);
    message.append(el("div", "role", role === "user" ? "You" : (app.models.get(app.selected) || {}).display_name || "Model"));
    const body = el("div", "body");
    if (role === "user") body.textContent = text;
    message.append(body);
    $("history").append(message);
    scrollToEnd(true);
    return message;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  function settingsBody(modelId) {
    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...app.history);
    const body = { model: modelId, messages, stream: true };
    const temperature = Number($("temperature").value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (Number.isInteger(maxTokens) && maxTokens > 0) {
      const model = app.models.get(modelId);
      body.max_tokens = model ? Math.min(maxTokens, model.context_length) : maxTokens;
    }
    return body;
  }

  async function readStream(response, onToken) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          reader.cancel().catch(() => {});
          return;
        }
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (_) {
          continue;
        }
        if (chunk.error) throw new ApiError(500, chunk.error);
        const choice = (chunk.choices || [])[0] || {};
        const piece = (choice.delta && choice.delta.content) || choice.text || "";
        if (piece) onToken(piece);
      }
    }
  }

  function markReady(modelId) {
    // An answer means a ready engine, whatever the last push or poll said.
    const state = app.states.get(modelId);
    if (state && state.phase === "ready") return;
    applyState({ ...(state || {}), model: modelId, phase: "ready", ready: true, pct: 100, error: "",
      instance: state ? state.instance : null });
  }

  async function send(text) {
    const modelId = app.selected;
    if (!modelId) {
      showNotice("Pick a model first.");
      return;
    }
    if (app.controller) return;
    $("notice").hidden = true;
    barError = null;
    app.lastFailedPrompt = null;
    app.history.push({ role: "user", content: text });
    const userMessage = addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.classList.add("pending");
    const replyBody = reply.querySelector(".body");
    replyBody.append(el("span", "typing", "…"));

    const controller = new AbortController();
    app.controller = controller;
    app.waiting = true;
    app.barShownForRequest = false;
    setBusy(true);
    renderBar();

    let answer = "";
    let chunks = 0;
    let painted = false;
    const paint = () => {
      painted = false;
      replyBody.innerHTML = renderMarkdown(answer);
      scrollToEnd(false);
    };
    const onToken = (piece) => {
      if (app.waiting) {
        app.waiting = false;
        app.barShownForRequest = false;
        reply.classList.remove("pending");
        renderBar();
      }
      answer += piece;
      chunks += 1;
      reply.dataset.chunks = String(chunks);
      if (!painted) {
        painted = true;
        requestAnimationFrame(paint);
      }
    };

    try {
      for (;;) {
        const response = await fetch(config.urls.chat, {
          method: "POST", credentials: "same-origin", signal: controller.signal,
          headers: { ...jsonHeaders(), "X-Porten-Warmup-Budget": String(config.warmupBudgetS) },
          body: JSON.stringify(settingsBody(modelId)),
        });
        if (response.ok) {
          markReady(modelId);
          await readStream(response, onToken);
          break;
        }
        const error = await readError(response);
        if (response.status === 503 && error.code === "model_warming") {
          // The load goes on without us; ask again when it should be further along.
          const retryAfter = Number(response.headers.get("Retry-After")) || 2;
          pollState(modelId);
          await sleep(1000 * Math.min(Math.max(retryAfter, 1), MAX_RETRY_WAIT_S), controller.signal);
          continue;
        }
        throw error;
      }
      paint();
      reply.classList.add("done");
      if (answer) {
        app.history.push({ role: "assistant", content: answer });
      } else {
        replyBody.replaceChildren(el("span", "note", "The model returned no text."));
        app.history.pop();
      }
    } catch (error) {
      reply.classList.remove("pending");
      if (error && error.name === "AbortError") {
        paint();
        reply.append(el("div", "note", "Stopped."));
        if (answer) app.history.push({ role: "assistant", content: answer });
        else app.history.pop();
      } else {
        if (answer) paint();
        else replyBody.replaceChildren();
        showReplyError(reply, error, text, userMessage, modelId);
        if (answer) app.history.push({ role: "assistant", content: answer });
        else app.history.pop();
        if (error instanceof ApiError && error.code === "model_not_found") refreshCatalog();
        if (error instanceof ApiError) pollState(modelId);
      }
    } finally {
      app.controller = null;
      app.waiting = false;
      app.barShownForRequest = false;
      reply.classList.remove("pending");
      setBusy(false);
      renderBar();
    }
  }

  function showReplyError(reply, error, prompt, userMessage, modelId) {
    const { words, detail } = describeError(error);
    const box = el("div", "error");
    box.dataset.code = (error && error.code) || "";
    box.append(el("strong", "", words), el("div", "error-detail", detail));
    const again = el("button", "button small", "Try again");
    again.type = "button";
    again.addEventListener("click", () => {
      if (app.controller) return;
      userMessage.remove();
      reply.remove();
      send(prompt);
    });
    box.append(again);
    reply.append(box);
    reply.classList.add("failed");
    app.lastFailedPrompt = { model: modelId, prompt, userMessage, reply };
    renderBar();
    scrollToEnd(true);
  }

  function clearChat() {
    if (app.controller) app.controller.abort();
    app.history = [];
    app.lastFailedPrompt = null;
    const history = $("history");
    history.replaceChildren($("hint"));
    $("hint").hidden = false;
  }

  function selectModel(modelId) {
    if (modelId === app.selected) return;
    app.selected = modelId;
    barError = null;
    app.lastUpdateAt = Date.now();
    for (const [id, row] of app.rows) row.item.setAttribute("aria-pressed", String(id === modelId));
    renderHeader();
    renderBar();
    if (!modelId) {
      closeSocket();
      return;
    }
    openSocket(modelId);
    const state = app.states.get(modelId);
    const phase = state ? state.phase : "idle";
    if (config.prewarmOnPick && (phase === "idle" || phase === "failed")) prewarm(modelId);
    $("prompt").focus();
  }

  function canRetry() {
    const failed = app.lastFailedPrompt;
    return Boolean(config.prewarmOnPick || (failed && failed.model === app.selected));
  }

  function retryLoad() {
    barError = null;
    const failed = app.lastFailedPrompt;
    if (failed && failed.model === app.selected && !app.controller) {
      failed.userMessage.remove();
      failed.reply.remove();
      send(failed.prompt);
    } else if (config.prewarmOnPick && app.selected) {
      prewarm(app.selected);
    } else {
      renderBar();
      $("prompt").focus();
    }
  }

  // --- wiring -----------------------------------------------------------------------------------

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || app.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (app.controller) app.controller.abort(); });
  $("clear").addEventListener("click", clearChat);
  $("warming-retry").addEventListener("click", retryLoad);
  $("model-filter").addEventListener("input", renderPicker);
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && app.socket && app.socket.readyState === WebSocket.OPEN) {
      app.socket.send(JSON.stringify({ type: "refresh" }));
    }
  });

  loadCatalog(config.catalog || []);
  refreshCatalog();
  setInterval(watchdog, 500);
  setInterval(refreshCatalog, CATALOG_POLL_MS);

  // For tests and the curious: the pure parts of the page.
  window.PortenPlayground = { renderMarkdown, escapeHtml, formatSize, formatEta, state: app };
})();

// The conversation: the request for each message, the streamed answer, the history sent back, and its errors.
import { $, el, showNotice } from "./dom.js";
import { ApiError, describeError, jsonHeaders, readError } from "./http.js";
import { renderMarkdown } from "./markdown.js";
import { refreshCatalog } from "./catalog.js";
import { applyState, pollState, prewarm, renderBar } from "./warming.js";

const MAX_RETRY_WAIT_S = 5;

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

function scrollToEnd(force) {
  const history = $("history");
  const nearEnd = history.scrollHeight - history.scrollTop - history.clientHeight < 80;
  if (force || nearEnd) history.scrollTop = history.scrollHeight;
}

function addMessage(app, role, text) {
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

function settingsBody(app, modelId) {
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
      // A stream that began before its model was ready ends with an error event when the load
      // fails or outlasts the budget; it says which status the error would have had.
      if (chunk.error) throw new ApiError(chunk.error.status || 502, chunk.error);
      const choice = (chunk.choices || [])[0] || {};
      const piece = (choice.delta && choice.delta.content) || choice.text || "";
      if (piece) onToken(piece);
    }
  }
}

function markReady(app, modelId) {
  // An answer means a ready engine, whatever the last push or poll said.
  const state = app.states.get(modelId);
  if (state && state.phase === "ready") return;
  applyState(app, { ...(state || {}), model: modelId, phase: "ready", ready: true, pct: 100, error: "",
    instance: state ? state.instance : null });
}

export async function send(app, text) {
  const modelId = app.selected;
  if (!modelId) {
    showNotice("Pick a model first.");
    return;
  }
  if (app.controller) return;
  $("notice").hidden = true;
  app.barError = null;
  app.lastFailedPrompt = null;
  app.history.push({ role: "user", content: text });
  const userMessage = addMessage(app, "user", text);
  const reply = addMessage(app, "assistant", "");
  reply.classList.add("pending");
  const replyBody = reply.querySelector(".body");
  replyBody.append(el("span", "typing", "…"));

  const controller = new AbortController();
  app.controller = controller;
  app.waiting = true;
  app.barShownForRequest = false;
  setBusy(true);
  renderBar(app);

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
      markReady(app, modelId);
      app.waiting = false;
      app.barShownForRequest = false;
      reply.classList.remove("pending");
      renderBar(app);
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
      const response = await fetch(app.config.urls.chat, {
        method: "POST", credentials: "same-origin", signal: controller.signal,
        headers: { ...jsonHeaders(app.config), "X-Porten-Warmup-Budget": String(app.config.warmupBudgetS) },
        body: JSON.stringify(settingsBody(app, modelId)),
      });
      let error;
      if (response.ok) {
        // The headers come at once, also while a cold model loads: the bar goes on until a token.
        try {
          await readStream(response, onToken);
          break;
        } catch (streamError) {
          if (!(streamError instanceof ApiError) || chunks > 0) throw streamError;
          error = streamError;
        }
      } else {
        error = await readError(response);
      }
      if (error.status === 503 && error.code === "model_warming") {
        // The load goes on without us; ask again when it should be further along.
        const retryAfter = Number(response.headers.get("Retry-After")) || 2;
        pollState(app, modelId);
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
      showReplyError(app, reply, error, text, userMessage, modelId);
      if (answer) app.history.push({ role: "assistant", content: answer });
      else app.history.pop();
      if (error instanceof ApiError && error.code === "model_not_found") refreshCatalog(app);
      if (error instanceof ApiError) pollState(app, modelId);
    }
  } finally {
    app.controller = null;
    app.waiting = false;
    app.barShownForRequest = false;
    reply.classList.remove("pending");
    setBusy(false);
    renderBar(app);
  }
}

function showReplyError(app, reply, error, prompt, userMessage, modelId) {
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
    send(app, prompt);
  });
  box.append(again);
  reply.append(box);
  reply.classList.add("failed");
  app.lastFailedPrompt = { model: modelId, prompt, userMessage, reply };
  renderBar(app);
  scrollToEnd(true);
}

export function stopAnswer(app) {
  if (app.controller) app.controller.abort();
}

export function clearChat(app) {
  if (app.controller) app.controller.abort();
  app.history = [];
  app.lastFailedPrompt = null;
  const history = $("history");
  history.replaceChildren($("hint"));
  $("hint").hidden = false;
}

// The bar's Retry: resend the prompt that failed on this model, or else ask for the load again.
export function retryLoad(app) {
  app.barError = null;
  const failed = app.lastFailedPrompt;
  if (failed && failed.model === app.selected && !app.controller) {
    failed.userMessage.remove();
    failed.reply.remove();
    send(app, failed.prompt);
  } else if (app.config.prewarmOnPick && app.selected) {
    prewarm(app, app.selected);
  } else {
    renderBar(app);
    $("prompt").focus();
  }
}

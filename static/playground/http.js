// Talking to the hub: the CSRF header it wants, and its OpenAI-shaped errors put into words.

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

function csrfToken(config) {
  // The cookie is the freshest copy (signing in again in another tab rotates it).
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : config.csrfToken;
}

export function jsonHeaders(config) {
  return { "Content-Type": "application/json", "X-CSRFToken": csrfToken(config) };
}

export class ApiError extends Error {
  constructor(status, error) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (error && error.code) || null;
    this.detail = error || {};
  }
}

export async function readError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  const error = body && body.error ? body.error : { message: `The server answered HTTP ${response.status}.`, code: null };
  return new ApiError(response.status, error);
}

export function describeError(error) {
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

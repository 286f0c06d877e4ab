"""Checks an OpenAI request body before it reaches an engine (engines are not good at bad input)."""
from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from typing import Any

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}


@dataclass
class BadRequest(Exception):
    message: str
    param: str | None = None


def _number(body: dict, name: str, low: float, high: float) -> None:
    if name in body and body[name] is not None:
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
            raise BadRequest(f"'{name}' must be a number between {low:g} and {high:g}", name)


def _positive_int(body: dict, name: str, high: int | None = None) -> None:
    if name in body and body[name] is not None:
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadRequest(f"'{name}' must be a positive integer", name)
        if high is not None and value > high:
            raise BadRequest(f"'{name}' is {value}, more than this model's context length of {high}", name)


def validate_common(body: Any) -> str:
    """Checks shared by both endpoints; returns the model id."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise BadRequest("Missing required field 'model'.", "model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("'model' must be a non-empty string.", "model")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be true or false.", "stream")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _positive_int(body, "n", 16)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))):
        raise BadRequest("'stop' must be a string or a list of up to 4 strings.", "stop")
    return model


def validate_limits(body: dict, *, context_length: int) -> None:
    _positive_int(body, "max_tokens", context_length)
    _positive_int(body, "max_completion_tokens", context_length)


def validate_chat(body: dict) -> None:
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("Missing required field 'messages'.", "messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of messages.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'.", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}.", f"messages[{i}].role")
        content = message.get("content")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise BadRequest(f"messages[{i}].content is required.", f"messages[{i}].content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts.", f"messages[{i}].content")


def validate_completion(body: dict) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("Missing required field 'prompt'.", "prompt")
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and (
        all(isinstance(p, str) for p in prompt) or all(isinstance(p, int) and not isinstance(p, bool) for p in prompt)))
    if not ok:
        raise BadRequest("'prompt' must be a string, a list of strings or a list of token ids.", "prompt")


# What each engine cannot do, so a request asking for it gets a 400 rather than a silent ignore.
UNSUPPORTED = {
    "llamacpp": {"n_above_1": True, "logprobs": True, "response_formats": {"text", "json_object"}},
}


def adapt(body: dict, *, engine: str) -> bool:
    """Rewrite `body` in place into what the engine understands, as the current OpenAI API allows it
    to be sent: optional fields sent as null dropped, `max_completion_tokens` as `max_tokens`, role
    `developer` as `system`. Returns whether anything changed; raises BadRequest for a feature the
    engine does not support."""
    changed = False
    for key in [key for key, value in body.items() if value is None]:
        del body[key]
        changed = True
    if "max_completion_tokens" in body:
        wanted = body.pop("max_completion_tokens")
        body["max_tokens"] = min(wanted, body["max_tokens"]) if "max_tokens" in body else wanted
        changed = True
    messages = body.get("messages")
    if isinstance(messages, list) and any(m.get("role") == "developer" for m in messages):
        body["messages"] = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
        changed = True
    limits = UNSUPPORTED.get(engine)
    if limits:
        if limits["n_above_1"] and body.get("n", 1) > 1:
            raise BadRequest("'n' above 1 is not supported by this model's engine (llama.cpp): send n requests.", "n")
        if limits["logprobs"] and (body.get("logprobs") or body.get("top_logprobs")):
            param = "logprobs" if body.get("logprobs") else "top_logprobs"
            raise BadRequest(f"'{param}' is not supported by this model's engine (llama.cpp).", param)
        response_format = body.get("response_format")
        if response_format is not None:
            kind = response_format.get("type") if isinstance(response_format, dict) else None
            if kind not in limits["response_formats"]:
                raise BadRequest(f"response_format type {kind!r} is not supported by this model's engine "
                                 f"(llama.cpp); use one of {', '.join(sorted(limits['response_formats']))}.",
                                 "response_format.type")
    return changed


def validate_embeddings(body: dict) -> None:
    items = body.get("input")
    if items is None:
        raise BadRequest("Missing required field 'input'.", "input")
    is_tokens = isinstance(items, list) and items and all(isinstance(t, int) and not isinstance(t, bool) for t in items)
    ok = (isinstance(items, str) and items) or is_tokens or (
        isinstance(items, list) and 0 < len(items) <= 2048 and (
            all(isinstance(i, str) and i for i in items)
            or all(isinstance(i, list) and i and all(isinstance(t, int) and not isinstance(t, bool) for t in i)
                   for i in items)))
    if not ok:
        raise BadRequest("'input' must be a non-empty string, a list of up to 2048 non-empty strings, or token ids.",
                         "input")
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    if body.get("dimensions") is not None:
        raise BadRequest("'dimensions' is not supported: this model's embeddings have a fixed size.", "dimensions")


def pooled_embeddings(answer: dict, *, base64_out: bool) -> dict:
    """An engine's embeddings answer in the OpenAI shape: one vector per input. An engine that
    returns a vector per token (llama.cpp with a model that has no pooling of its own) has them
    averaged and scaled to length 1; vectors go out as base64 float32 when asked."""
    for item in answer.get("data", []):
        vector = item.get("embedding") or []
        if vector and isinstance(vector[0], list):
            width = len(vector[0])
            mean = [sum(token[i] for token in vector) / len(vector) for i in range(width)]
            norm = math.sqrt(sum(v * v for v in mean)) or 1.0
            vector = [v / norm for v in mean]
        item["embedding"] = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if base64_out \
            else vector
    return answer

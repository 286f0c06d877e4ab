"""The parts of the OpenAPI schema drf-spectacular cannot see: /v1's token routes and the public
warming endpoint are plain async views (no DRF on the hot path), so they are described here."""
from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """porten.drf.ApiKeyAuthentication in the schema: a bearer token."""

    target_class = "porten.drf.ApiKeyAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A Porten API key (operator role for /api/)."}

ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


ERRORS = {
    "400": _error("Invalid request: the error's param names the field."),
    "401": _error("Missing or invalid API key."),
    "404": _error("The model does not exist or is not offered (code model_not_found)."),
    "413": _error("The body is larger than PORTEN_MAX_BODY_BYTES."),
    "429": _error("Too many requests with an invalid key from this address (Retry-After)."),
    "502": _error("The engine failed on this request or stopped answering (engine_error, engine_unavailable)."),
    "503": _error("The model is warming past the request's budget (model_warming, with Retry-After), its load "
                  "failed (model_load_failed), or no node can fit it (no_capacity, fleet_busy)."),
}

OPERATOR_ERRORS = {
    "400": _error("Invalid input: the error's param names the field."),
    "401": _error("No key or session, or an invalid key."),
    "403": _error("A key without the operator role, or a signed-in user who is not staff."),
    "404": _error("No such entry, node, instance or key."),
    "405": _error("Method not allowed here."),
    "409": _error("Conflicts with the fleet's state (model_in_use, max_replicas, node_unavailable, no_capacity, "
                  "not_loaded, model_disabled)."),
    "429": _error("Too many requests with an invalid key from this address."),
}

SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type", "code", "param"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "code": {"type": "string", "nullable": True}, "param": {"type": "string", "nullable": True}}}},
    },
    "ChatMessage": {
        "type": "object", "required": ["role"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool", "function"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
                        "nullable": True},
            "name": {"type": "string"}, "tool_calls": {"type": "array", "items": {"type": "object"}},
            "tool_call_id": {"type": "string"},
        },
    },
    "ChatCompletionRequest": {
        "type": "object", "required": ["model", "messages"], "additionalProperties": True,
        "properties": {
            "model": {"type": "string", "description": "A catalog id or alias from /v1/models."},
            "messages": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/ChatMessage"}},
            "stream": {"type": "boolean"}, "max_tokens": {"type": "integer", "minimum": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
            "seed": {"type": "integer"}, "tools": {"type": "array", "items": {"type": "object"}},
            "response_format": {"type": "object"},
        },
    },
    "CompletionRequest": {
        "type": "object", "required": ["model", "prompt"], "additionalProperties": True,
        "properties": {
            "model": {"type": "string"},
            "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "stream": {"type": "boolean"}, "max_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        },
    },
    "EmbeddingRequest": {
        "type": "object", "required": ["model", "input"],
        "properties": {
            "model": {"type": "string"},
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        },
    },
    "WarmingState": {
        "type": "object", "required": ["model", "ready", "phase", "done_mb", "total_mb", "pct"],
        "properties": {
            "model": {"type": "string"}, "ready": {"type": "boolean"},
            "phase": {"type": "string", "enum": ["idle", "queued", "downloading", "loading", "ready", "failed"]},
            "done_mb": {"type": "number"}, "total_mb": {"type": "number"}, "pct": {"type": "number"},
        },
    },
}

BUDGET = {"name": "X-Porten-Warmup-Budget", "in": "header", "required": False, "schema": {"type": "number", "minimum": 0},
          "description": "Seconds this request may wait for a cold model (default PORTEN_WARMUP_BUDGET_S)."}
ANSWER_HEADERS = {name: {"schema": {"type": "string"}, "description": description} for name, description in [
    ("X-Porten-Node", "The node that served the answer."),
    ("X-Porten-Cold-Start", "Whether this request waited for the model to load."),
    ("X-Porten-Load-Seconds", "How long it waited, when it did."),
    ("X-Porten-Queue-Seconds", "Time queued for one of the engine's slots."),
]}


def _token_route(operation_id: str, summary: str, request_schema: str, *, streams: bool) -> dict:
    content = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {"post": {
        "operationId": operation_id, "tags": ["v1"], "summary": summary, "security": [{"bearerAuth": []}, {"cookieAuth": []}],
        "parameters": [BUDGET],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request_schema}"}}}},
        "responses": {"200": {"description": "The engine's answer (OpenAI shape); with stream, server-sent events.",
                              "headers": ANSWER_HEADERS, "content": content}, **ERRORS},
    }}


PATHS = {
    "/v1/chat/completions": _token_route("v1_chat_completions", "Chat completion (any offered model; a cold one loads first)",
                                         "ChatCompletionRequest", streams=True),
    "/v1/completions": _token_route("v1_completions", "Text completion", "CompletionRequest", streams=True),
    "/v1/embeddings": _token_route("v1_embeddings", "Embeddings (models with the embeddings capability)", "EmbeddingRequest",
                                   streams=False),
    "/public/v1/models/warming": {"get": {
        "operationId": "public_model_warming", "tags": ["public"], "summary": "How far an offered model is from serving (no key needed unless PORTEN_PUBLIC_WARMING is off; a key or session sent is held to its scope)",
        "security": [{}, {"bearerAuth": []}],
        "parameters": [{"name": "model", "in": "query", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "Its warming state.", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/WarmingState"}}}},
            "400": ERRORS["400"], "401": ERRORS["401"], "404": ERRORS["404"]},
    }},
    "/healthz": {"get": {
        "operationId": "healthz", "tags": ["public"], "summary": "Whether the hub can reach its database and Redis", "security": [],
        "responses": {"200": {"description": "Healthy.", "content": {"application/json": {"schema": {"type": "object"}}}},
                      "503": {"description": "The database or Redis is unreachable.",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
}


def add_gateway_paths(result: dict, generator, request, public) -> dict:
    """drf-spectacular post-processing hook: add PATHS and their component schemas."""
    components = result.setdefault("components", {})
    components.setdefault("schemas", {}).update(SCHEMAS)
    schemes = components.setdefault("securitySchemes", {})
    schemes.setdefault("bearerAuth", {"type": "http", "scheme": "bearer", "description": "A Porten API key."})
    schemes.setdefault("cookieAuth", {"type": "apiKey", "in": "cookie", "name": "sessionid"})
    paths = result.setdefault("paths", {})
    for path, item in paths.items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            for status, response in OPERATOR_ERRORS.items():
                if path.startswith("/api/"):
                    responses.setdefault(status, response)
            if path.startswith("/v1/models"):
                responses.setdefault("401", ERRORS["401"])
                responses.setdefault("404", ERRORS["404"])
    paths.update(PATHS)
    return result

"""The gateway's views: /v1/chat/completions, /v1/completions and the public warming endpoint."""
from __future__ import annotations

import json

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from catalog.selectors import offered_model_aget
from fleet.selectors import model_replicas, model_warming_state
from porten.auth import authenticate_async, bad_key_retry_after, csrf_failure, too_many_bad_keys
from porten.errors import error_response, invalid_request, model_not_found, unauthorized

from .asgi import too_large
from .validation import (
    BadRequest, adapt, pooled_embeddings, validate_chat, validate_common, validate_completion, validate_embeddings,
    validate_limits,
)
from .warm import (
    EngineGone, WarmupFailed, cold_stream, engine_unavailable, move_soon, proxy, ready_route, record_demand,
    warm_route,
)

BUDGET_HEADER = "HTTP_X_PORTEN_WARMUP_BUDGET"


def _budget(request) -> float:
    raw = request.META.get(BUDGET_HEADER)
    if raw is None or raw == "":
        return settings.PORTEN_WARMUP_BUDGET_S
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest("X-Porten-Warmup-Budget must be a number of seconds.", "X-Porten-Warmup-Budget")
    if not (value >= 0) or value == float("inf"):
        raise BadRequest("X-Porten-Warmup-Budget must be zero or more seconds.", "X-Porten-Warmup-Budget")
    return min(value, settings.PORTEN_WARMUP_BUDGET_MAX_S)


async def _generate(request, *, path: str, validate_kind) -> HttpResponse:
    caller, via_session = await authenticate_async(request)
    if caller is None:
        if request.META.get("HTTP_AUTHORIZATION") and (
                wait_s := await bad_key_retry_after(request.META.get("REMOTE_ADDR", ""))) is not None:
            return too_many_bad_keys(wait_s)
        return unauthorized()
    if via_session and (failure := csrf_failure(request)) is not None:
        return failure
    try:
        content_length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        content_length = 0
    if content_length > settings.PORTEN_MAX_BODY_BYTES:
        return too_large()
    try:
        raw = request.body
    except RequestDataTooBig:
        return too_large()
    if len(raw) > settings.PORTEN_MAX_BODY_BYTES:
        return too_large()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return invalid_request("The request body is not valid JSON.")
    try:
        model_id = validate_common(body)
        validate_kind(body)
        budget_s = _budget(request)
    except BadRequest as exc:
        return invalid_request(exc.message, param=exc.param)
    model = await offered_model_aget(model_id)
    if model is None:
        return model_not_found(model_id)
    embedding = path == "/v1/embeddings"
    if not (model.supports_embeddings if embedding else model.supports_chat):
        needed = "embeddings" if embedding else "chat"
        return invalid_request(f"The model '{model_id}' does not serve {path}; pick one from /v1/models whose "
                               f"capabilities include {needed}.", param="model")
    try:
        validate_limits(body, context_length=model.context_length)
        if adapt(body, engine=model.engine):
            raw = json.dumps(body).encode()
    except BadRequest as exc:
        return invalid_request(exc.message, param=exc.param)
    if embedding:
        base64_out = body.pop("encoding_format", None) == "base64"
        raw = json.dumps(body).encode()
        response = await _answer(model, path, raw, stream=False, budget_s=budget_s)
        if response.status_code == 200:
            response.content = json.dumps(pooled_embeddings(json.loads(response.content), base64_out=base64_out))
            response["Content-Length"] = str(len(response.content))
        return response
    return await _answer(model, path, raw, stream=bool(body.get("stream")), budget_s=budget_s)


async def _answer(model, path: str, raw: bytes, *, stream: bool, budget_s: float) -> HttpResponse:
    """The engine's answer: from a ready replica, else once the model is loaded."""
    route = await ready_route(model)
    if route is not None and route.node_draining:
        move_soon(model)
    if route is not None:
        try:
            return await proxy(route, path=path, payload=raw, stream=stream, model=model, count_served=True)
        except EngineGone:
            pass  # the cached engine went away (unloaded or crashed): the cold path finds or loads another
    await record_demand(model.model_id, served=False)
    if stream:
        return cold_stream(model, path=path, payload=raw, budget_s=budget_s)
    try:
        route = await warm_route(model, budget_s=budget_s)
        return await proxy(route, path=path, payload=raw, stream=stream, model=model)
    except WarmupFailed as failure:
        return failure.response
    except EngineGone:
        return engine_unavailable(model)


def _method_not_allowed(request) -> HttpResponse:
    return error_response(405, f"{request.method} is not allowed here; use POST.", type="invalid_request_error",
                          code="method_not_allowed", headers={"Allow": "POST"})


@csrf_exempt
async def chat_completions(request) -> HttpResponse:
    if request.method != "POST":
        return _method_not_allowed(request)
    return await _generate(request, path="/v1/chat/completions", validate_kind=validate_chat)


@csrf_exempt
async def embeddings(request) -> HttpResponse:
    if request.method != "POST":
        return _method_not_allowed(request)
    return await _generate(request, path="/v1/embeddings", validate_kind=validate_embeddings)


@csrf_exempt
async def completions(request) -> HttpResponse:
    if request.method != "POST":
        return _method_not_allowed(request)
    return await _generate(request, path="/v1/completions", validate_kind=validate_completion)


async def warming(request) -> HttpResponse:
    model_id = request.GET.get("model", "")
    if not model_id:
        return invalid_request("Give the model id: ?model=ID", param="model")
    model = await offered_model_aget(model_id)
    if model is None:
        return model_not_found(model_id)
    state = await model_warming_state(model)
    return JsonResponse({**state.as_dict(), "replicas": await model_replicas(model)})


async def v1_not_found(request, rest: str = "") -> HttpResponse:
    return error_response(404, f"Unknown API route: {request.path}", type="invalid_request_error", code="not_found")

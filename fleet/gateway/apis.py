"""The gateway's views: /v1/chat/completions, /v1/completions, /v1/embeddings (each within the caller's
scope and limits, its usage recorded) and the public warming endpoint."""
from __future__ import annotations

import json

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from catalog.selectors import offered_model_aget
from fleet.selectors import model_replicas, model_warming_state
from porten.auth import (
    authenticate_async, bad_key_retry_after, caller_scope, csrf_failure, session_user, too_many_bad_keys,
)
from porten.errors import error_response, invalid_request, model_not_found, unauthorized
from porten.metrics import rate_limited_count

from .asgi import EventStream, too_large
from .limits import RateLimited, estimated_prompt_tokens, limits_take
from .metering import Meter, StreamMeter, metered
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
    scope = await caller_scope(caller)
    if model is None or not scope.allows(model.model_id):
        return model_not_found(model_id)  # a model outside the caller's scope is not theirs to know of
    request.porten_model = model.model_id  # the model label of this request's metrics (porten.metrics)
    embedding = path == "/v1/embeddings"
    if not (model.supports_embeddings if embedding else model.supports_chat):
        needed = "embeddings" if embedding else "chat"
        return invalid_request(f"The model '{model_id}' does not serve {path}; pick one from /v1/models whose "
                               f"capabilities include {needed}.", param="model")
    try:
        validate_limits(body, context_length=model.context_length)
        renamed = model_id != model.model_id  # an alias: the engine serves the model under its id
        if renamed:
            body["model"] = model.model_id
        if adapt(body, engine=model.engine) or renamed:
            raw = json.dumps(body).encode()
    except BadRequest as exc:
        return invalid_request(exc.message, param=exc.param)
    stream = bool(body.get("stream")) and not embedding
    options = body.get("stream_options")
    client_wants_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    if stream and not client_wants_usage and settings.PORTEN_USAGE_ENABLED:
        # Asked of the engine for usage records; the StreamMeter keeps it from the client.
        if options is None and (trimmed := raw.rstrip()).endswith(b"}"):
            raw = trimmed[:-1] + b', "stream_options": {"include_usage": true}}'  # no second encoding
        else:
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            raw = json.dumps(body).encode()
    estimate = estimated_prompt_tokens(raw)
    try:
        taken = await limits_take(scope, estimated_tokens=estimate)
    except RateLimited as limited:
        rate_limited_count(limited.what)
        return rate_limited(limited)
    meter = Meter(scope, model.model_id, taken, estimated_prompt_tokens=estimate, client_wants_usage=client_wants_usage)
    try:
        if embedding:
            base64_out = body.pop("encoding_format", None) == "base64"
            raw = json.dumps(body).encode()
            response = await _answer(model, path, raw, stream=False, budget_s=budget_s)
            if response.status_code == 200:
                response.content = json.dumps(pooled_embeddings(json.loads(response.content), base64_out=base64_out))
                response["Content-Length"] = str(len(response.content))
        else:
            response = await _answer(model, path, raw, stream=stream, budget_s=budget_s)
    except BaseException:
        meter.finish(prompt_tokens=0, completion_tokens=0)  # cancelled: nothing used, slot back
        raise
    if not (settings.PORTEN_USAGE_ENABLED or taken.counted):
        pass  # nothing to record or settle
    elif isinstance(response, EventStream):
        response = metered_stream(response, meter)
    else:
        meter.finish_answer(response.status_code, response.content)
    for name, value in taken.headers.items():
        response[name] = value
    return response


def rate_limited(limited: RateLimited) -> HttpResponse:
    what = {"requests": "requests per minute", "tokens": "tokens per minute",
            "concurrent": "concurrent requests"}[limited.what]
    return error_response(429, f"Rate limit reached for {what} on this key; retry after {limited.retry_after_s} s.",
                          type=limited.what, code="rate_limit_exceeded",
                          headers={"Retry-After": str(limited.retry_after_s), **limited.headers})


def metered_stream(response: EventStream, meter: Meter) -> EventStream:
    """The same answer, its events watched by a StreamMeter as they are sent."""
    response.meter = StreamMeter(meter)
    response.streaming_content = metered(response.source, response.meter)  # for Django's handler
    return response


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
        failure.response["X-Porten-Cold-Start"] = "true"  # it waited for a load, as every answer here says
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
    """A load's progress. Open to anyone unless PORTEN_PUBLIC_WARMING is off; a caller that sends a
    key or a session is held to its scope, as on /v1."""
    model_id = request.GET.get("model", "")
    if not model_id:
        return invalid_request("Give the model id: ?model=ID", param="model")
    scope = None
    if request.META.get("HTTP_AUTHORIZATION") or not settings.PORTEN_PUBLIC_WARMING:
        caller, _ = await authenticate_async(request)
        if caller is None:
            return unauthorized()
        scope = await caller_scope(caller)
    elif (user := await session_user(request)) is not None and user.is_authenticated:
        scope = await caller_scope(user)
    model = await offered_model_aget(model_id)
    if model is None or (scope is not None and not scope.allows(model.model_id)):
        return model_not_found(model_id)
    state = await model_warming_state(model)
    return JsonResponse({**state.as_dict(), "replicas": await model_replicas(model)})


async def v1_not_found(request, rest: str = "") -> HttpResponse:
    return error_response(404, f"Unknown API route: {request.path}", type="invalid_request_error", code="not_found")

"""The playground page and its prewarm endpoint, and the operators' fleet page: parse, call, serialize."""
from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required, user_passes_test
from django.http import HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from catalog.selectors import offered_model_aget, offered_models
from fleet.gateway.warm import model_prewarm
from fleet.live import PHASE_LABELS, phase_label
from fleet.placement import PlacementError
from fleet.selectors import model_warming_state
from porten.auth import caller_scope, csrf_failure
from porten.errors import error_response, invalid_request, model_not_found

from .selectors import fleet_overview

# The page waits for a cold model as long as the gateway lets it (it caps this at
# PORTEN_WARMUP_BUDGET_MAX_S); the progress bar keeps the person informed meanwhile.
PAGE_WARMUP_BUDGET_S = 1800


@login_required  # any account: LOGIN_URL is Porten's own sign-in page, not the admin's
async def playground(request) -> HttpResponse:
    user = await request.auser()
    scope = await caller_scope(user)  # None: staff, no bound
    catalog = []
    async for model in offered_models():
        if scope is not None and not scope.allows(model.model_id):
            continue
        state = await model_warming_state(model)
        catalog.append({
            "id": model.model_id, "display_name": model.display_name, "description": model.description,
            "context_length": model.context_length, "capabilities": model.capabilities,
            "state": state.as_dict(), "badge": phase_label(state.phase, state.pct),
        })
    config = {
        "catalog": catalog,
        "prewarmOnPick": settings.PORTEN_PREWARM_ON_PICK,
        "warmupBudgetS": PAGE_WARMUP_BUDGET_S,
        "phaseLabels": PHASE_LABELS,
        "csrfToken": get_token(request),
        "urls": {
            "models": reverse("v1-models"),
            "chat": reverse("v1-chat-completions"),
            "warming": reverse("public-warming"),
            "prewarm": reverse("playground-prewarm"),
            "socket": "/ws/warming/",  # playground/routing.py
        },
    }
    return render(request, "playground/index.html", {
        "catalog": catalog, "config": config, "username": user.get_username(), "staff": user.is_staff,
        "prewarm_on_pick": settings.PORTEN_PREWARM_ON_PICK,
    })


@csrf_exempt  # checked below, so the refusal has the OpenAI error shape the page reads
async def prewarm(request) -> HttpResponse:
    if request.method != "POST":
        return error_response(405, f"{request.method} is not allowed here; use POST.", type="invalid_request_error",
                              code="method_not_allowed", headers={"Allow": "POST"})
    user = await request.auser()
    if not user.is_authenticated:
        return error_response(401, "Sign in to use the playground.", type="invalid_request_error",
                              code="not_authenticated")
    if (failure := csrf_failure(request, "CSRF check failed; send the X-CSRFToken header (reload the page if it is stale).")) is not None:
        return failure
    if not settings.PORTEN_PREWARM_ON_PICK:
        return error_response(409, "Warming a model when it is picked is turned off (PORTEN_PREWARM_ON_PICK); "
                              "it warms with the first message instead.", type="invalid_request_error",
                              code="prewarm_disabled")
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return invalid_request("The request body is not valid JSON.")
    model_id = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model_id, str) or not model_id:
        return invalid_request('Give the model to warm: {"model": "<id>"}.', param="model")
    model = await offered_model_aget(model_id)
    scope = await caller_scope(user)
    if model is None or (scope is not None and not scope.allows(model.model_id)):
        return model_not_found(model_id)
    try:
        await model_prewarm(model)
    except PlacementError as exc:
        headers = {} if exc.code == "no_capacity" else {"Retry-After": "30"}
        return error_response(503, exc.reason, type="server_error", code=exc.code, headers=headers)
    return JsonResponse((await model_warming_state(model)).as_dict())


def is_staff(user) -> bool:
    return user.is_active and user.is_staff


@user_passes_test(is_staff)  # anyone else goes to settings.LOGIN_URL
async def fleet_page(request) -> HttpResponse:
    user = await request.auser()
    overview = await sync_to_async(fleet_overview, thread_sensitive=False)()
    flower_host = settings.PORTEN_FLOWER_HOST
    if flower_host in ("0.0.0.0", "::", ""):  # listening everywhere: reachable where the hub is
        flower_host = request.get_host().rsplit(":", 1)[0]
    config = {
        "overview": overview,
        "urls": {"socket": "/ws/fleet/", "flower": f"http://{flower_host}:{settings.PORTEN_FLOWER_PORT}/"},
    }
    return render(request, "playground/fleet.html", {
        "config": config, "username": user.get_username(), "flower_url": config["urls"]["flower"],
    })

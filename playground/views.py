"""The playground page and its prewarm endpoint: parse, call, serialize."""
from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware, get_token
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt

from catalog.models import CatalogModel
from catalog.selectors import offered_model_aget, offered_models
from fleet.demand import demand_record
from fleet.models import ACTIVE_PHASES, Instance
from fleet.placement import PlacementError, instance_ensure
from fleet.selectors import model_warming_state
from porten.errors import error_response, invalid_request, model_not_found

# The page waits for a cold model as long as the gateway lets it (it caps this at
# PORTEN_WARMUP_BUDGET_MAX_S); the progress bar keeps the person informed meanwhile.
PAGE_WARMUP_BUDGET_S = 1800


@login_required
async def playground(request) -> HttpResponse:
    user = await request.auser()
    models = [model async for model in offered_models()]
    catalog = [
        {
            "id": model.model_id, "display_name": model.display_name, "description": model.description,
            "context_length": model.context_length, "capabilities": model.capabilities,
            "state": await model_warming_state(model),
        }
        for model in models
    ]
    for entry in catalog:
        entry["badge"] = picker_badge(entry["state"])
    config = {
        "catalog": catalog,
        "prewarmOnPick": settings.PORTEN_PREWARM_ON_PICK,
        "warmupBudgetS": PAGE_WARMUP_BUDGET_S,
        "csrfToken": get_token(request),
        "urls": {
            "models": "/v1/models",
            "chat": "/v1/chat/completions",
            "warming": "/public/v1/models/warming",
            "prewarm": "/playground/prewarm",
            "socket": "/ws/warming/",
        },
    }
    return render(request, "playground/index.html", {
        "catalog": catalog, "config": config, "username": user.get_username(),
        "prewarm_on_pick": settings.PORTEN_PREWARM_ON_PICK,
    })


def picker_badge(state: dict) -> dict:
    """The picker's label for a model's state (static/playground/app.js stateLabel says the same)."""
    phase = state["phase"]
    if phase == "downloading":
        return {"text": f"warming {int(state['pct'])}%", "kind": "warming"}
    text, kind = {"ready": ("ready", "ready"), "queued": ("warming", "warming"), "loading": ("loading", "warming"),
                  "failed": ("failed", "failed")}.get(phase, ("cold", "cold"))
    return {"text": text, "kind": kind}


async def model_prewarm(model: CatalogModel) -> None:
    """Start loading a model someone picked, so the load overlaps with their typing. A pick counts
    as unmet demand, like a cold request would. Raises PlacementError when the fleet cannot take it."""
    if await Instance.objects.filter(model=model, phase__in=ACTIVE_PHASES).aexists():
        return
    await demand_record(model.model_id, served=False)
    await sync_to_async(instance_ensure, thread_sensitive=False)(model=model)


def _csrf_failure(request) -> HttpResponse | None:
    if CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is None:
        return None
    return error_response(403, "CSRF check failed; send the X-CSRFToken header (reload the page if it is stale).",
                          type="invalid_request_error", code="csrf_failed")


@csrf_exempt  # checked below, so the refusal has the OpenAI error shape the page reads
async def prewarm(request) -> HttpResponse:
    if request.method != "POST":
        return error_response(405, f"{request.method} is not allowed here; use POST.", type="invalid_request_error",
                              code="method_not_allowed", headers={"Allow": "POST"})
    user = await request.auser()
    if not user.is_authenticated:
        return error_response(401, "Sign in to use the playground.", type="invalid_request_error",
                              code="not_authenticated")
    if (failure := _csrf_failure(request)) is not None:
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
    if model is None:
        return model_not_found(model_id)
    try:
        await model_prewarm(model)
    except PlacementError as exc:
        headers = {} if exc.code == "no_capacity" else {"Retry-After": "30"}
        return error_response(503, exc.reason, type="server_error", code=exc.code, headers=headers)
    return JsonResponse(await model_warming_state(model))

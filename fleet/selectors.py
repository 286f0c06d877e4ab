"""Reads of fleet state."""
from __future__ import annotations

from dataclasses import replace

from porten.redis import aredis_client

from .live import WarmingState, instance_state, state_key
from .models import ACTIVE_PHASES, Instance, Phase


def ready_model_ids() -> set[str]:
    return set(Instance.objects.filter(phase=Phase.READY).values_list("model__model_id", flat=True))


async def model_warming_state(model) -> WarmingState:
    """What the public warming endpoint and the playground show, under its public phase name: the
    database holds the phase, Redis the freshest byte counts of a download in progress."""
    instance = await Instance.objects.filter(model=model, phase__in=ACTIVE_PHASES).select_related(
        "model", "node").afirst()
    if instance is None:
        latest = await Instance.objects.filter(model=model).select_related("model", "node").order_by(
            "-created_at").afirst()
        if latest is not None and latest.phase == Phase.FAILED:
            instance = latest
    if instance is None:
        return WarmingState(model=model.model_id)
    state = instance_state(instance)
    try:
        live = WarmingState.from_json(await aredis_client().get(state_key(model.model_id)))
    except Exception:
        live = None  # Redis trouble: the database's counts are a little older, no worse
    if live is not None and live.instance == instance.pk and live.phase == instance.phase:
        state = live
    if state.phase != Phase.FAILED and state.error:
        state = replace(state, error="")
    return state.public()


async def model_replicas(model) -> list[dict]:
    """Each live replica of the model: its node, public phase and download progress."""
    replicas = []
    async for instance in Instance.objects.filter(model=model, phase__in=ACTIVE_PHASES).select_related(
            "model", "node").order_by("replica"):
        state = instance_state(instance).public().as_dict()
        replicas.append({key: state[key] for key in ("node", "phase", "pct", "instance")})
    return replicas

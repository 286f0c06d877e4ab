"""Reads of fleet state."""
from __future__ import annotations

from .models import Instance, Phase


def ready_model_ids() -> set[str]:
    return set(Instance.objects.filter(phase=Phase.READY).values_list("model__model_id", flat=True))


async def model_warming_state(model) -> dict:
    """What the public warming endpoint and the playground show: the database holds the phase,
    Redis the freshest byte counts of a download in progress."""
    from .live import state_key, warming_state
    from .models import ACTIVE_PHASES
    from porten.redis import aredis_client
    import json

    instance = await Instance.objects.filter(model=model, phase__in=ACTIVE_PHASES).afirst()
    if instance is None:
        latest = await Instance.objects.filter(model=model).order_by("-created_at").afirst()
        if latest is not None and latest.phase == Phase.FAILED:
            instance = latest
    if instance is None:
        return warming_state(model_id=model.model_id, phase="idle", instance_id=None)
    phase = instance.phase
    # Draining still serves; to a user it is ready. Only the six public phases are shown.
    public_phase = {Phase.DRAINING: Phase.READY}.get(phase, phase)
    live = None
    try:
        raw = await aredis_client().get(state_key(model.model_id))
        live = json.loads(raw) if raw else None
    except Exception:
        live = None
    done, total, rate = instance.bytes_done, instance.bytes_total, instance.download_rate_bps
    if live and live.get("instance") == instance.pk and live.get("phase") == phase:
        done, total = live.get("bytes_done", done), live.get("bytes_total", total)
        rate = live.get("rate_mbps", 0) * 1_000_000 or rate
    return warming_state(model_id=model.model_id, phase=public_phase, instance_id=instance.pk, bytes_done=done,
                         bytes_total=total, rate_bps=rate, error=instance.last_error if phase == Phase.FAILED else "")

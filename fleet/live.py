"""Live warming state of each model: kept in Redis (the truth between database writes), published
on a Redis channel for gateway waiters and to the model's channel-layer group for the playground."""
from __future__ import annotations

import json
import logging
import time

from asgiref.sync import async_to_sync

from porten.redis import redis_client

logger = logging.getLogger(__name__)

STATE_TTL_S = 24 * 3600


def state_key(model_id: str) -> str:
    return f"porten:warming:{model_id}"


def events_channel(model_id: str) -> str:
    return f"porten:events:{model_id}"


def warming_group(model_id: str) -> str:
    # Channel-layer group names allow only ASCII letters, digits, hyphens, underscores and periods.
    return f"warming.{model_id}"


def warming_state(*, model_id: str, phase: str, instance_id: int | None, bytes_done: int = 0,
                  bytes_total: int = 0, rate_bps: float = 0.0, error: str = "", load_seconds: float | None = None,
                  node: str = "") -> dict:
    pct = round(100.0 * bytes_done / bytes_total, 1) if bytes_total else (100.0 if phase in ("loading", "ready") else 0.0)
    eta_s = round((bytes_total - bytes_done) / rate_bps, 1) if rate_bps > 0 and bytes_total > bytes_done else None
    return {
        "model": model_id,
        "ready": phase == "ready",
        "phase": phase,
        "done_mb": round(bytes_done / 1_000_000, 1),
        "total_mb": round(bytes_total / 1_000_000, 1),
        "pct": pct,
        "bytes_done": bytes_done,
        "bytes_total": bytes_total,
        "rate_mbps": round(rate_bps / 1_000_000, 1),
        "eta_s": eta_s,
        "instance": instance_id,
        "node": node,
        "error": error,
        "load_seconds": load_seconds,
        "updated_at": time.time(),
    }


def publish_state(state: dict) -> None:
    """Store and broadcast one model's state. Best effort: a failed push never fails a load."""
    model_id = state["model"]
    payload = json.dumps(state)
    try:
        client = redis_client()
        pipe = client.pipeline(transaction=False)
        pipe.set(state_key(model_id), payload, ex=STATE_TTL_S)
        pipe.publish(events_channel(model_id), payload)
        pipe.execute()
    except Exception:
        logger.warning("could not publish state of %s to Redis", model_id, exc_info=True)
    try:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is not None:
            async_to_sync(layer.group_send)(warming_group(model_id), {"type": "warming.update", "state": state})
    except Exception:
        logger.warning("could not push state of %s to the channel layer", model_id, exc_info=True)


def read_state(model_id: str) -> dict | None:
    raw = redis_client().get(state_key(model_id))
    return json.loads(raw) if raw else None

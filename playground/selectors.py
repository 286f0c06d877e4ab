"""Reads for the operators' fleet page: every node and the instances on them, with live load and demand."""
from __future__ import annotations

import time
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from fleet.demand import demand_counts, demand_recent
from fleet.live import WarmingState, inflight_key, instance_state, phase_label, state_key
from fleet.models import RESIDENT_PHASES, Instance, Node, Phase
from porten.redis import redis_client

# A failed load stays on the page this long, so an operator sees why before it goes.
FAILED_SHOWN_S = 15 * 60


def _node_row(node: Node, now) -> dict:
    # Sizes as the node reports them, in MB of 10^6 bytes (porten.units), like every size Porten shows.
    gpus = [{"index": g.get("index", i), "name": g.get("name", ""), "total_mb": int(g.get("total_mb", 0)),
             "free_mb": int(g.get("free_mb", 0))} for i, g in enumerate(node.gpus or [])]
    online = node.online
    return {
        "name": node.name,
        "hostname": node.hostname,
        "address": node.address,
        "online": online,
        "draining": node.draining,
        "status": "offline" if not online else "draining" if node.draining else "online",
        "has_gpu": node.has_gpu,
        "gpus": gpus,
        "memory_total_mb": sum(g["total_mb"] for g in gpus),
        "memory_free_mb": sum(g["free_mb"] for g in gpus),
        "disk_free_mb": node.disk_free_mb,
        "models_on_disk": list(node.models_on_disk or []),
        "last_heartbeat_at": node.last_heartbeat_at.isoformat() if node.last_heartbeat_at else None,
        "heartbeat_age_s": round((now - node.last_heartbeat_at).total_seconds(), 1) if node.last_heartbeat_at else None,
    }


def fleet_overview() -> dict:
    """The whole fleet as the page draws it. Sync (ORM and Redis): call it through sync_to_async.
    Instances are those holding memory on a node, and loads that failed in the last FAILED_SHOWN_S."""
    now = timezone.now()
    nodes = list(Node.objects.all())
    instances = _instances(now)
    model_ids = sorted({i.model.model_id for i in instances})
    client = redis_client()
    pipe = client.pipeline(transaction=False)
    for instance in instances:
        pipe.hvals(inflight_key(instance.pk))
    for model_id in model_ids:
        pipe.get(state_key(model_id))
    replies = pipe.execute()
    inflight = {i.pk: sum(max(0, int(v)) for v in replies[n]) for n, i in enumerate(instances)}
    live = {m: WarmingState.from_json(replies[len(instances) + n]) for n, m in enumerate(model_ids)}
    demand = demand_recent(model_ids)
    requests = demand_counts(model_ids)
    rows = []
    for instance in instances:
        state = instance_state(instance)
        fresher = live.get(instance.model.model_id)
        # Redis holds the freshest byte counts of a download (the row is written about once a second).
        if fresher is not None and fresher.instance == instance.pk and fresher.phase == instance.phase:
            state = fresher
        wire = state.public().as_dict()
        model_id = instance.model.model_id
        rows.append({
            "id": instance.pk,
            "model": model_id,
            "display_name": instance.model.display_name,
            "node": instance.node.name,
            "replica": instance.replica,
            "phase": instance.phase,
            "public_phase": wire["phase"],
            "label": phase_label(instance.phase, state.pct),
            "done_mb": wire["done_mb"],
            "total_mb": wire["total_mb"],
            "pct": wire["pct"],
            "rate_mbps": wire["rate_mbps"],
            "eta_s": wire["eta_s"],
            "vram_mb": instance.vram_mb,
            "inflight": inflight[instance.pk],
            "slots": instance.slots,
            "demand": round(demand.get(model_id, 0.0), 1),
            "requests": int(requests.get(model_id, 0)),
            "error": instance.last_error if instance.phase == Phase.FAILED else "",
            "load_seconds": instance.load_seconds,
            "created_at": instance.created_at.isoformat(),
        })
    return {
        "at": time.time(),
        "demand_window_s": settings.PORTEN_DEMAND_WINDOW_S,
        "nodes": [_node_row(node, now) for node in nodes],
        "instances": rows,
    }


def _instances(now) -> list[Instance]:
    shown = Instance.objects.select_related("model", "node").order_by("node__name", "model__model_id", "replica")
    resident = list(shown.filter(phase__in=RESIDENT_PHASES))
    failed = list(shown.filter(phase=Phase.FAILED, updated_at__gte=now - timedelta(seconds=FAILED_SHOWN_S)))
    return resident + failed

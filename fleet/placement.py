"""Turning fleet rows into the planner's plain data, and its decision back into rows and tasks."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from catalog.models import CatalogModel
from porten.redis import redis_client

from . import planner
from .demand import demand_recent, last_requests
from .dispatch import instance_enqueue_load, instance_enqueue_unload
from .live import instance_publish
from .models import ACTIVE_PHASES, RESIDENT_PHASES, Instance, Node, Phase
from .services import instance_fail_lost

logger = logging.getLogger(__name__)

PLACEMENT_LOCK = "porten:placement-lock"
EVICTED_KEY = "porten:evicted-for-room"  # model id -> when it was evicted for another model
DEFAULT_RELOAD_S = 20.0
RESTORE_HORIZON_S = 3600.0  # an eviction older than this is forgotten
RESTORE_PER_SWEEP = 3


class PlacementError(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@contextmanager
def placement_lock(timeout_s: float = 30.0):
    """One placement decision at a time across every hub process, so two models never get the same
    free memory. Decisions take milliseconds; the lock expires if a hub dies holding it."""
    lock = redis_client().lock(PLACEMENT_LOCK, timeout=timeout_s, blocking_timeout=timeout_s)
    if not lock.acquire():
        raise PlacementError("fleet_busy", "the planner is busy; retry shortly")
    try:
        yield
    finally:
        try:
            lock.release()
        except Exception:
            pass


def node_stale_s() -> float:
    return max(3 * settings.PORTEN_HEARTBEAT_S, 30.0)


def node_online(node: Node) -> bool:
    return node.last_heartbeat_at is not None and (
        timezone.now() - node.last_heartbeat_at).total_seconds() <= node_stale_s()


def online_nodes() -> list[Node]:
    return list(Node.objects.filter(last_heartbeat_at__gte=timezone.now() - timedelta(seconds=node_stale_s())))


def node_state(node: Node, resident: list[Instance]) -> planner.NodeState:
    """Free memory per device: the heartbeat's live reading, less what was placed since and has not
    allocated yet, and never more than total less everything resident."""
    gpus = []
    for device in node.gpus:
        index, total = int(device["index"]), int(device["total_mb"])
        on_device = [i for i in resident if index in (i.gpu_indices or [0])]
        resident_mb = sum(i.vram_mb // max(1, len(i.gpu_indices or [0])) for i in on_device)
        free = total - resident_mb
        if node.has_gpu:
            pending_mb = sum(i.vram_mb // max(1, len(i.gpu_indices or [0])) for i in on_device
                             if i.phase in (Phase.QUEUED, Phase.DOWNLOADING, Phase.LOADING))
            free = min(free, int(device.get("free_mb", total)) - pending_mb)
        gpus.append(planner.GpuState(index=index, total_mb=total, free_mb=max(0, free)))
    loaded = tuple(
        planner.LoadedInstance(
            instance_id=i.pk, model_id=i.model.model_id, vram_mb=i.vram_mb,
            gpu_indices=tuple(i.gpu_indices or [0]), pinned=i.model.pinned,
            loaded_at_s=(i.ready_at or i.created_at).timestamp(),
            reload_s=i.load_seconds or DEFAULT_RELOAD_S,
            evictable=i.phase == Phase.READY,
        )
        for i in resident
    )
    return planner.NodeState(
        name=node.name, gpus=tuple(gpus), instances=loaded, models_on_disk=frozenset(node.models_on_disk or ()),
    )


def fleet_states() -> list[planner.NodeState]:
    nodes = online_nodes()
    resident = list(Instance.objects.filter(node__in=nodes, phase__in=RESIDENT_PHASES).select_related("model"))
    return [node_state(node, [i for i in resident if i.node_id == node.pk]) for node in nodes]


def model_spec(model: CatalogModel) -> planner.ModelSpec:
    past = Instance.objects.filter(model=model, load_seconds__isnull=False).order_by("-ready_at").values_list(
        "load_seconds", flat=True).first()
    return planner.ModelSpec(model_id=model.model_id, vram_mb=model.vram_mb, pinned=model.pinned,
                             load_s=past or DEFAULT_RELOAD_S)


def active_instance(model: CatalogModel) -> Instance | None:
    """The model's live instance. One on a node that stopped sending heartbeats is failed here, so
    a dead machine does not hold its models hostage: the caller then places the model again."""
    instance = Instance.objects.filter(model=model, phase__in=ACTIVE_PHASES).select_related("node", "model").first()
    if instance is None or node_online(instance.node):
        return instance
    instance_fail_lost(instance=instance, reason=f"node {instance.node.name} stopped sending heartbeats")
    return None


def instance_ensure(*, model: CatalogModel) -> Instance:
    """The model's live instance, placing (and evicting for) a new one when there is none.
    Single flight: concurrent callers in any process get the same instance."""
    existing = active_instance(model)
    if existing is not None:
        return existing
    with placement_lock():
        existing = active_instance(model)
        if existing is not None:
            return existing
        states = fleet_states()
        model_ids = sorted({model.model_id} | {i.model_id for s in states for i in s.instances})
        demand = planner.Demand(per_model=demand_recent(model_ids))
        started = time.perf_counter()
        decision = planner.place(model_spec(model), states, demand, now_s=time.time(),
                                 min_residency_s=settings.PORTEN_MIN_RESIDENCY_S)
        logger.info("placement of %s in %.1f ms: %s", model.model_id, (time.perf_counter() - started) * 1000,
                    decision.reason)
        if isinstance(decision, planner.NoPlacement):
            raise PlacementError("no_capacity" if decision.code == planner.NO_CAPACITY else "fleet_busy",
                                 decision.reason)
        return _apply(model, decision)


def _apply(model: CatalogModel, decision: planner.Placement) -> Instance:
    node = Node.objects.get(name=decision.node)
    victims: list[Instance] = []
    try:
        with transaction.atomic():
            for victim in decision.evict:
                # Draining: no new requests go to it; in-flight ones finish before it unloads.
                if Instance.objects.filter(pk=victim.instance_id, phase=Phase.READY).update(
                        phase=Phase.DRAINING, updated_at=timezone.now()):
                    victims.append(Instance.objects.select_related("model", "node").get(pk=victim.instance_id))
            instance = Instance.objects.create(
                model=model, node=node, phase=Phase.QUEUED, gpu_indices=list(decision.gpu_indices),
                vram_mb=model.vram_mb, placement_reason=decision.reason, waits_for=[v.pk for v in victims],
            )
            transaction.on_commit(lambda: [instance_enqueue_unload(v) for v in victims])
            transaction.on_commit(lambda: instance_enqueue_load(instance))
    except IntegrityError:
        # Another hub process placed this model between our check and insert: use theirs.
        existing = active_instance(model)
        if existing is None:
            raise
        return existing
    # Remember what was pushed out, so it comes back when room frees up; this model is placed now.
    marks = redis_client().pipeline(transaction=False)
    if victims:
        marks.hset(EVICTED_KEY, mapping={v.model.model_id: time.time() for v in victims})
    marks.hdel(EVICTED_KEY, model.model_id)
    marks.execute()
    for victim in victims:
        instance_publish(victim)
    instance_publish(instance)
    return instance


def instances_unload_idle(*, now_s: float | None = None) -> list[int]:
    """Unload ready instances whose model had no request for a whole demand window."""
    now_s = time.time() if now_s is None else now_s
    states = fleet_states()
    model_ids = sorted({i.model_id for s in states for i in s.instances})
    idle = planner.idle_instances(states, last_requests(model_ids), now_s=now_s,
                                  window_s=settings.PORTEN_DEMAND_WINDOW_S)
    unloaded = []
    for _node_name, loaded in idle:
        if Instance.objects.filter(pk=loaded.instance_id, phase=Phase.READY).update(
                phase=Phase.DRAINING, updated_at=timezone.now()):
            instance = Instance.objects.select_related("model", "node").get(pk=loaded.instance_id)
            instance_publish(instance)
            instance_enqueue_unload(instance)
            unloaded.append(instance.pk)
            logger.info("unloading idle %s (no request for %.0f s)", instance, settings.PORTEN_DEMAND_WINDOW_S)
    return unloaded


def instances_restore_evicted(*, now_s: float | None = None) -> list[int]:
    """Load models that were evicted to make room for another back into memory that has come free
    since (an idle model unloaded, a load that failed), the most demanded first.

    It never evicts: a restored model only takes memory nobody uses, and like any model it unloads
    after a demand window without requests. A model unloaded for idleness is not restored, only
    one pushed out while it still had demand (bench/simulate.py; docs/performance.md).
    """
    now_s = time.time() if now_s is None else now_s
    client = redis_client()
    evicted = {k: float(v) for k, v in client.hgetall(EVICTED_KEY).items()}
    forgotten = [m for m, at in evicted.items() if now_s - at > RESTORE_HORIZON_S]
    if forgotten:
        client.hdel(EVICTED_KEY, *forgotten)
    models = {m.model_id: m for m in CatalogModel.objects.filter(
        model_id__in=[m for m in evicted if m not in forgotten], enabled=True)}
    if not models:
        return []
    demand, last = demand_recent(list(models)), last_requests(list(models))
    order = sorted(models, key=lambda m: (-demand.get(m, 0.0), -last.get(m, 0.0)))[:RESTORE_PER_SWEEP]
    restored = []
    with placement_lock():
        states = fleet_states()
        for model_id in order:
            model = models[model_id]
            active = active_instance(model)
            if active is not None:
                if active.phase != Phase.DRAINING:
                    client.hdel(EVICTED_KEY, model_id)  # asked for again and loaded meanwhile
                continue  # (or still draining out)
            # No demand given: the planner then only fits, it never evicts for this model.
            decision = planner.place(model_spec(model), states, planner.Demand(), now_s=now_s)
            if not isinstance(decision, planner.Placement):
                continue  # no free room yet; try again on the next sweep
            instance = _apply(model, replace(decision, reason="restored after eviction; " + decision.reason))
            logger.info("restoring %s: %s", model_id, instance.placement_reason)
            restored.append(instance.pk)
            states = fleet_states()
    return restored

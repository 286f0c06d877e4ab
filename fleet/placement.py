"""Turning fleet rows into the planner's plain data, and its decision back into rows and tasks."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from catalog.models import CatalogModel
from porten.redis import redis_client

from . import planner
from .demand import demand_recent, last_requests
from .dispatch import instance_enqueue_load, instance_enqueue_unload
from .live import inflight_count, instance_publish
from .metrics import EVICTIONS, metric_count
from .models import ACTIVE_PHASES, RESIDENT_PHASES, Instance, Node, Phase, node_stale_s
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


def node_online(node: Node) -> bool:
    return node.online


def online_nodes(*, placeable: bool = False) -> list[Node]:
    """Nodes sending heartbeats; with `placeable`, only those taking new placements (not draining)."""
    nodes = Node.objects.filter(last_heartbeat_at__gte=timezone.now() - timedelta(seconds=node_stale_s()))
    return list(nodes.filter(draining=False) if placeable else nodes)


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


def fleet_states(*, placeable: bool = False) -> list[planner.NodeState]:
    nodes = online_nodes(placeable=placeable)
    resident = list(Instance.objects.filter(node__in=nodes, phase__in=RESIDENT_PHASES).select_related("model"))
    return [node_state(node, [i for i in resident if i.node_id == node.pk]) for node in nodes]


def model_spec(model: CatalogModel) -> planner.ModelSpec:
    past = Instance.objects.filter(model=model, load_seconds__isnull=False).order_by("-ready_at").values_list(
        "load_seconds", flat=True).first()
    return planner.ModelSpec(model_id=model.model_id, vram_mb=model.vram_mb, pinned=model.pinned,
                             load_s=past or DEFAULT_RELOAD_S)


def live_instances(model: CatalogModel) -> list[Instance]:
    """The model's live instances (its replicas), ready ones first. Those on a node that stopped
    sending heartbeats are failed here, so a dead machine does not hold its models hostage."""
    found = []
    for instance in Instance.objects.filter(model=model, phase__in=ACTIVE_PHASES).select_related(
            "node", "model").order_by("replica"):
        if node_online(instance.node):
            found.append(instance)
        else:
            instance_fail_lost(instance=instance, reason=f"node {instance.node.name} stopped sending heartbeats")
    return sorted(found, key=lambda i: i.phase != Phase.READY)


def active_instance(model: CatalogModel) -> Instance | None:
    """The instance a request for the model waits on: a live one on a node that takes placements
    (ready ones first), else None, also when the only live ones are on draining nodes."""
    return next((i for i in live_instances(model) if not i.node.draining), None)


def instance_ensure(*, model: CatalogModel) -> Instance:
    """The model's live instance, placing (and evicting for) a new one when there is none on a node
    that takes placements. Single flight: concurrent callers in any process get the same instance."""
    existing = active_instance(model)
    if existing is not None:
        return existing
    with placement_lock():
        existing = active_instance(model)
        if existing is not None:
            return existing
        states = fleet_states(placeable=True)
        decision = _decide(model, states, replica=False)
        if isinstance(decision, planner.NoPlacement):
            raise PlacementError("no_capacity" if decision.code == planner.NO_CAPACITY else "fleet_busy",
                                 decision.reason)
        return _apply(model, decision)


def _decide(model: CatalogModel, states: list[planner.NodeState], *, replica: bool,
            with_demand: bool = True) -> planner.Placement | planner.NoPlacement:
    model_ids = sorted({model.model_id} | {i.model_id for s in states for i in s.instances})
    demand = planner.Demand(per_model=demand_recent(model_ids)) if with_demand else planner.Demand()
    started = time.perf_counter()
    place = planner.place_replica if replica else planner.place
    decision = place(model_spec(model), states, demand, now_s=time.time(),
                     min_residency_s=settings.PORTEN_MIN_RESIDENCY_S)
    logger.info("placement of %s%s in %.1f ms: %s", model.model_id, " (one more replica)" if replica else "",
                (time.perf_counter() - started) * 1000, decision.reason)
    return decision


def _free_replica_slot(model: CatalogModel) -> int:
    taken = set(Instance.objects.filter(model=model, phase__in=ACTIVE_PHASES).values_list("replica", flat=True))
    return next(slot for slot in range(len(taken) + 1) if slot not in taken)


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
                replica=_free_replica_slot(model),
            )
            transaction.on_commit(lambda: [instance_enqueue_unload(v) for v in victims])
            transaction.on_commit(lambda: instance_enqueue_load(instance))
    except IntegrityError:
        # Another hub process placed this replica between our check and insert: use theirs.
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
        metric_count(EVICTIONS, victim.model.model_id, "room")
    instance_publish(instance)
    return instance


def instances_unload_idle(*, now_s: float | None = None) -> list[int]:
    """Unload ready instances whose model had no request for a whole demand window."""
    now_s = time.time() if now_s is None else now_s
    states = fleet_states()
    model_ids = sorted({i.model_id for s in states for i in s.instances})
    own_windows = dict(CatalogModel.objects.filter(model_id__in=model_ids, idle_ttl_s__isnull=False).values_list(
        "model_id", "idle_ttl_s"))
    idle = planner.idle_instances(states, last_requests(model_ids), now_s=now_s,
                                  window_s=settings.PORTEN_DEMAND_WINDOW_S, window_s_for=own_windows)
    kept = _replicas_kept(model_ids)
    unloaded = []
    for _node_name, loaded in idle:
        if kept.get(loaded.model_id, 0) > 0:
            kept[loaded.model_id] -= 1  # one of the model's min_replicas: stays loaded
            continue
        if Instance.objects.filter(pk=loaded.instance_id, phase=Phase.READY).update(
                phase=Phase.DRAINING, updated_at=timezone.now()):
            instance = Instance.objects.select_related("model", "node").get(pk=loaded.instance_id)
            instance_publish(instance)
            instance_enqueue_unload(instance)
            metric_count(EVICTIONS, instance.model.model_id, "idle")
            unloaded.append(instance.pk)
            logger.info("unloading idle %s (no request for %.0f s)", instance,
                        own_windows.get(loaded.model_id, settings.PORTEN_DEMAND_WINDOW_S))
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
        states = fleet_states(placeable=True)
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
            states = fleet_states(placeable=True)
    return restored


def _replicas_kept(model_ids: list[str]) -> dict[str, int]:
    return dict(CatalogModel.objects.filter(model_id__in=model_ids, min_replicas__gt=0).values_list(
        "model_id", "min_replicas"))


def _unload(instance_id: int, why: str, *, reason: str = "operator") -> bool:
    """Ready -> draining (in-flight requests finish), then the node unloads it. `reason` is the
    eviction's label in porten_evictions_total."""
    if not Instance.objects.filter(pk=instance_id, phase=Phase.READY).update(
            phase=Phase.DRAINING, updated_at=timezone.now()):
        return False
    instance = Instance.objects.select_related("model", "node").get(pk=instance_id)
    instance_publish(instance)
    instance_enqueue_unload(instance)
    metric_count(EVICTIONS, instance.model.model_id, reason)
    logger.info("unloading %s: %s", instance, why)
    return True


# --- nodes lost and drained -------------------------------------------------------------------

def nodes_fail_lost() -> list[int]:
    """Fail the live instances of nodes that stopped sending heartbeats (beat, every half heartbeat)."""
    stale = timezone.now() - timedelta(seconds=node_stale_s())
    lost = []
    for instance in Instance.objects.filter(phase__in=ACTIVE_PHASES).exclude(
            node__last_heartbeat_at__gte=stale).select_related("model", "node"):
        instance_fail_lost(instance=instance, reason=f"node {instance.node.name} stopped sending heartbeats")
        lost.append(instance.pk)
    return lost


def instances_requeue_lost(*, after_s: float | None = None) -> list[int]:
    """Send the load again for instances queued longer than `after_s` on a live node that is loading
    nothing else (beat): their message was lost between the row's commit and its send (Redis went
    away, or the hub died, in between), and every request for the model would otherwise wait on a
    load that never starts. The load task claims its row, so a message that was only late runs once."""
    after_s = settings.PORTEN_REQUEUE_AFTER_S if after_s is None else after_s
    now = timezone.now()
    loading = Instance.objects.filter(phase__in=(Phase.DOWNLOADING, Phase.LOADING)).values("node_id")
    requeued = []
    for instance in Instance.objects.filter(
            phase=Phase.QUEUED, updated_at__lt=now - timedelta(seconds=after_s),
            node__last_heartbeat_at__gte=now - timedelta(seconds=node_stale_s()),
    ).exclude(node_id__in=loading).select_related("model", "node"):
        # Sent again at most once per `after_s`, and only while it is still queued.
        if Instance.objects.filter(pk=instance.pk, phase=Phase.QUEUED).update(updated_at=timezone.now()):
            logger.warning("the load of %s on %s was queued %.0f s ago and never started: sent again",
                           instance.model.model_id, instance.node.name, (now - instance.updated_at).total_seconds())
            instance_enqueue_load(instance)
            requeued.append(instance.pk)
    return requeued


def nodes_drain_sweep(*, idle_s: float | None = None) -> list[int]:
    """Unload what a draining node still serves once its model is ready elsewhere, or once the model
    had no request for `idle_s` (default: the drain deadline) and none is in flight on it."""
    idle_s = settings.PORTEN_DRAIN_DEADLINE_S if idle_s is None else idle_s
    on_drained = list(Instance.objects.filter(node__draining=True, phase=Phase.READY).select_related("model", "node"))
    if not on_drained:
        return []
    last = last_requests(sorted({i.model.model_id for i in on_drained}))
    ready_elsewhere = set(Instance.objects.filter(
        phase=Phase.READY, node__draining=False, model__in=[i.model_id for i in on_drained],
        node__last_heartbeat_at__gte=timezone.now() - timedelta(seconds=node_stale_s()),
    ).values_list("model_id", flat=True))
    now = time.time()
    moved = []
    for instance in on_drained:
        if instance.model_id in ready_elsewhere:
            why = f"node {instance.node.name} is draining and {instance.model.model_id} is ready elsewhere"
        elif now - last.get(instance.model.model_id, 0.0) >= idle_s and inflight_count(instance.pk) == 0:
            why = f"node {instance.node.name} is draining and {instance.model.model_id} is not in use"
        else:
            continue
        if _unload(instance.pk, why, reason="drain"):
            moved.append(instance.pk)
    return moved


# --- replicas ---------------------------------------------------------------------------------

SCALE_KEY = "porten:scale:{}:{}"  # (model id, "out" | "in") -> since when the model has been past its target


def replicas_autoscale(*, now_s: float | None = None) -> dict[str, list[int]]:
    """Keep each model's replicas between min_replicas and what its load needs (beat, every few
    seconds). One more replica loads when the ready ones have carried more than their target of
    requests in flight each for PORTEN_SCALE_OUT_AFTER_S, and none is warming already (so a burst
    makes one load per step); one unloads when the others could carry the load at half their
    target for a whole demand window; below min_replicas, one loads into free memory."""
    now_s = time.time() if now_s is None else now_s
    client = redis_client()
    added, removed = [], []
    for model in CatalogModel.objects.filter(enabled=True).filter(Q(max_replicas__gt=1) | Q(min_replicas__gt=0)):
        live = [i for i in live_instances(model) if not i.node.draining]
        ready = [i for i in live if i.phase == Phase.READY]
        warming = [i for i in live if i.phase in (Phase.QUEUED, Phase.DOWNLOADING, Phase.LOADING)]
        if len(live) < model.min_replicas and not warming:
            if (instance := _add_replica(model, live, with_demand=False, why="below min_replicas")) is not None:
                added.append(instance.pk)
            continue
        inflight = sum(inflight_count(i.pk) for i in ready)
        target = model.replica_target
        out_key, in_key = SCALE_KEY.format(model.model_id, "out"), SCALE_KEY.format(model.model_id, "in")
        if ready and inflight > target * len(ready):
            client.delete(in_key)
            if warming:  # the busy clock starts again once the new replica serves
                client.delete(out_key)
                continue
            client.set(out_key, now_s, nx=True, ex=3600)
            since = float(client.get(out_key) or now_s)
            if now_s - since >= settings.PORTEN_SCALE_OUT_AFTER_S and not warming and len(live) < model.max_replicas:
                why = f"{inflight} requests in flight on {len(ready)} replica(s), target {target} each"
                if (instance := _add_replica(model, live, with_demand=True, why=why)) is not None:
                    added.append(instance.pk)
                    client.delete(out_key)
            continue
        client.delete(out_key)
        keep = max(model.min_replicas, 1)
        if len(ready) > keep and inflight * 2 <= target * (len(ready) - 1):
            client.set(in_key, now_s, nx=True, ex=int(settings.PORTEN_DEMAND_WINDOW_S) + 3600)
            if now_s - float(client.get(in_key) or now_s) >= settings.PORTEN_DEMAND_WINDOW_S:
                newest = max(ready, key=lambda i: i.replica)
                if _unload(newest.pk, f"{inflight} requests in flight: {len(ready) - 1} replica(s) carry them",
                           reason="scale_in"):
                    removed.append(newest.pk)
                    client.delete(in_key)
        else:
            client.delete(in_key)
    return {"added": added, "removed": removed}


def _add_replica(model: CatalogModel, live: list[Instance], *, with_demand: bool, why: str) -> Instance | None:
    with placement_lock():
        states = fleet_states(placeable=True)
        decision = _decide(model, states, replica=bool(live), with_demand=with_demand)
        if isinstance(decision, planner.NoPlacement):
            return None
        try:
            return _apply(model, replace(decision, reason=f"replica {len(live) + 1}: {why}; {decision.reason}"))
        except IntegrityError:
            return None


# --- operators --------------------------------------------------------------------------------

def instance_load_now(*, model: CatalogModel, node_name: str = "") -> Instance:
    """Load the model now (an operator's request): wherever the planner chooses, or on the named node,
    as one more replica when it is live elsewhere. Its live instance there when it has one."""
    if not node_name:
        return instance_ensure(model=model)
    with placement_lock():
        live = live_instances(model)
        if (here := next((i for i in live if i.node.name == node_name), None)) is not None:
            return here
        if not Node.objects.filter(name=node_name).exists():
            raise PlacementError("node_not_found", f"there is no node named {node_name!r}")
        states = [s for s in fleet_states(placeable=True) if s.name == node_name]
        if not states:
            raise PlacementError("node_unavailable", f"node {node_name} is offline or draining")
        if len(live) >= model.max_replicas:
            raise PlacementError("max_replicas", f"{model.model_id} already has {len(live)} live replica(s), "
                                                 f"its max_replicas; raise it or unload one first")
        decision = _decide(model, states, replica=bool(live))
        if isinstance(decision, planner.NoPlacement):
            raise PlacementError("no_capacity", decision.reason)
        return _apply(model, replace(decision, reason=f"asked for by an operator; {decision.reason}"))


def instance_unload(*, instance: Instance) -> bool:
    """Unload an instance: a ready one drains its in-flight requests first; a warming one stops its
    load. False when it is already on its way out."""
    if instance.phase == Phase.READY:
        return _unload(instance.pk, "asked for by an operator")
    if instance.phase in (Phase.QUEUED, Phase.DOWNLOADING, Phase.LOADING):
        instance_enqueue_unload(instance)
        return True
    return False

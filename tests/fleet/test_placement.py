"""Placement from fleet rows: single flight, offline nodes, free memory from heartbeats."""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from django.utils import timezone

from fleet.models import Instance, Node, Phase
from fleet.placement import PlacementError, fleet_states, instance_ensure

pytestmark = pytest.mark.django_db(transaction=True)


def node(name: str, *, total_mb: int = 8000, free_mb: int | None = None, age_s: float = 0, has_gpu: bool = False):
    return Node.objects.create(
        name=name, has_gpu=has_gpu, last_heartbeat_at=timezone.now() - timedelta(seconds=age_s),
        gpus=[{"index": 0, "name": "gpu" if has_gpu else "cpu", "total_mb": total_mb,
               "free_mb": total_mb if free_mb is None else free_mb}],
    )


def test_a_model_on_a_dead_node_is_placed_again(catalog_model):
    model = catalog_model(model_id="orphaned", vram_mb=1000)
    dead = node("dead-node", age_s=600)
    alive = node("alive-node")
    lost = Instance.objects.create(model=model, node=dead, phase=Phase.READY, vram_mb=1000, port=1234)
    placed = instance_ensure(model=model)
    assert placed.node == alive and placed.phase == Phase.QUEUED
    lost.refresh_from_db()
    assert lost.phase == Phase.FAILED and "dead-node stopped sending heartbeats" in lost.last_error


def test_ensure_is_single_flight(catalog_model):
    model = catalog_model(model_id="once", vram_mb=1000)
    node("n1")
    first = instance_ensure(model=model)
    assert instance_ensure(model=model) == first
    assert Instance.objects.filter(model=model).count() == 1


def test_offline_nodes_are_not_candidates(catalog_model):
    model = catalog_model(model_id="nowhere", vram_mb=1000)
    node("gone", age_s=600)
    with pytest.raises(PlacementError) as exc:
        instance_ensure(model=model)
    assert exc.value.code == "no_capacity"
    assert not Instance.objects.filter(model=model).exists()


def test_gpu_free_memory_is_the_heartbeat_less_pending_loads(catalog_model):
    gpu = node("gpu-1", total_mb=80000, free_mb=60000, has_gpu=True)
    Instance.objects.create(model=catalog_model(model_id="loaded"), node=gpu, phase=Phase.READY, vram_mb=20000)
    Instance.objects.create(model=catalog_model(model_id="coming"), node=gpu, phase=Phase.DOWNLOADING, vram_mb=15000)
    (state,) = fleet_states()
    # NVML already counts the loaded engine; the one still downloading has not allocated yet.
    assert state.gpus[0].free_mb == 45000
    assert {i.model_id: i.evictable for i in state.instances} == {"loaded": True, "coming": False}


async def test_no_route_to_an_engine_on_a_dead_node(catalog_model):
    from asgiref.sync import sync_to_async

    from fleet.gateway.warm import ready_route

    model = await sync_to_async(catalog_model)(model_id="ghost-route", vram_mb=1000)
    dead = await sync_to_async(node)("dead-2", age_s=600)
    await Instance.objects.acreate(model=model, node=dead, phase=Phase.READY, vram_mb=1000, port=1234)
    assert await ready_route(model, max_age_s=0) is None
    await Node.objects.filter(pk=dead.pk).aupdate(last_heartbeat_at=timezone.now())
    route = await ready_route(model, max_age_s=0)
    assert route is not None and route.base_url.endswith(":1234")


def _requests(model_id: str, count: int, *, ago_s: float = 0.0) -> None:
    import time

    from fleet.demand import demand_commands
    from porten.redis import redis_client

    pipe = redis_client().pipeline(transaction=False)
    demand_commands(pipe, model_id, served=False, now=time.time() - ago_s, count=count)
    pipe.execute()


def test_recent_requests_outweigh_old_ones(catalog_model):
    from fleet.demand import demand_counts, demand_recent

    _requests("fresh-model", 3)
    _requests("stale-model", 3, ago_s=480)
    assert demand_counts(["fresh-model", "stale-model"]) == {"fresh-model": 3.0, "stale-model": 3.0}
    recent = demand_recent(["fresh-model", "stale-model", "never-asked"])
    assert 2.7 <= recent["fresh-model"] <= 3.0
    assert 0.3 <= recent["stale-model"] <= 0.8  # 8 minutes into a 10-minute window
    assert recent["never-asked"] == 0.0


def test_a_model_evicted_for_room_comes_back_when_memory_frees_and_never_by_evicting(catalog_model):
    from fleet.placement import EVICTED_KEY, instances_restore_evicted
    from porten.redis import redis_client

    redis_client().delete(EVICTED_KEY)
    pushed = catalog_model(model_id="pushed-out", vram_mb=5000)
    wanted = catalog_model(model_id="asked-for", vram_mb=5000)
    box = node("one-box", total_mb=8000)
    old = Instance.objects.create(model=pushed, node=box, phase=Phase.READY, vram_mb=5000, port=1,
                                  ready_at=timezone.now() - timedelta(hours=1))
    _requests("pushed-out", 1, ago_s=300)
    _requests("asked-for", 4)
    placed = instance_ensure(model=wanted)
    old.refresh_from_db()
    assert old.phase == Phase.DRAINING and placed.waits_for == [old.pk]

    # The requested model holds the memory: nothing is restored, nothing is evicted for it.
    assert instances_restore_evicted() == []
    Instance.objects.filter(pk=old.pk).update(phase=Phase.STOPPED)
    Instance.objects.filter(pk=placed.pk).update(phase=Phase.READY, ready_at=timezone.now())
    assert instances_restore_evicted() == []
    assert Instance.objects.get(pk=placed.pk).phase == Phase.READY

    # The requested model goes (idle, say): the evicted one comes back into the free memory.
    Instance.objects.filter(pk=placed.pk).update(phase=Phase.STOPPED)
    (restored_pk,) = instances_restore_evicted()
    restored = Instance.objects.get(pk=restored_pk)
    assert restored.model == pushed and restored.phase == Phase.QUEUED and restored.node == box
    assert restored.placement_reason.startswith("restored after eviction")
    # Placed again, it is no longer owed a restore; the model unloaded for idleness never was.
    assert not redis_client().hexists(EVICTED_KEY, "pushed-out")
    Instance.objects.filter(pk=restored.pk).update(phase=Phase.STOPPED)
    assert instances_restore_evicted() == []


def test_an_eviction_older_than_the_horizon_is_forgotten(catalog_model):
    import time

    from fleet.placement import EVICTED_KEY, RESTORE_HORIZON_S, instances_restore_evicted
    from porten.redis import redis_client

    catalog_model(model_id="long-gone", vram_mb=1000)
    node("roomy")
    redis_client().hset(EVICTED_KEY, "long-gone", time.time() - RESTORE_HORIZON_S - 5)
    assert instances_restore_evicted() == []
    assert not redis_client().hexists(EVICTED_KEY, "long-gone")
    assert not Instance.objects.filter(model__model_id="long-gone").exists()


async def test_cold_requests_in_one_process_share_one_placement_call(catalog_model, monkeypatch):
    from asgiref.sync import sync_to_async

    from fleet.gateway import warm as gateway

    model = await sync_to_async(catalog_model)(model_id="shared-placement", vram_mb=1000)
    await sync_to_async(node)("shared-node")
    calls = []
    real = gateway.instance_ensure

    def counted(**kwargs):
        calls.append(kwargs["model"].model_id)
        return real(**kwargs)

    monkeypatch.setattr(gateway, "instance_ensure", counted)
    # A burst made one call each, every one a thread and database queries, until the first answer got through.
    placed = await asyncio.gather(*[gateway._ensure(model) for _ in range(100)])
    assert len({instance.pk for instance in placed}) == 1
    assert calls == ["shared-placement"]
    # Shared while in flight only: the next waiter to find no instance asks again.
    assert (await gateway._ensure(model)).pk == placed[0].pk
    assert len(calls) == 2

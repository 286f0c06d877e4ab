"""Placement from fleet rows: single flight, offline nodes, free memory from heartbeats."""
from __future__ import annotations

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

    from fleet.gateway import ready_route

    model = await sync_to_async(catalog_model)(model_id="ghost-route", vram_mb=1000)
    dead = await sync_to_async(node)("dead-2", age_s=600)
    await Instance.objects.acreate(model=model, node=dead, phase=Phase.READY, vram_mb=1000, port=1234)
    assert await ready_route(model, use_cache=False) is None
    await Node.objects.filter(pk=dead.pk).aupdate(last_heartbeat_at=timezone.now())
    route = await ready_route(model, use_cache=False)
    assert route is not None and route.base_url.endswith(":1234")

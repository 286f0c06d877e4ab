"""Request-path caches answered at once just past their time, while one task looks again."""
from __future__ import annotations

import asyncio
import logging

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from catalog import selectors
from catalog.models import CatalogModel
from fleet import gateway
from fleet.models import Instance, Node, Phase
from porten import refresh

pytestmark = pytest.mark.django_db(transaction=True)


def age(cache: dict, key: str, seconds: float) -> None:
    """Make the entry for `key` look `seconds` older (monotonic time moves on without sleeping)."""
    stamp, value = cache[key]
    cache[key] = (stamp - seconds, value)


async def settled() -> None:
    while any(not task.done() for task in refresh._running.values()):
        await asyncio.sleep(0.01)


async def ready_on_port(catalog_model, port: int):
    model = await sync_to_async(catalog_model)(model_id="cached-route", vram_mb=1000)
    node = await Node.objects.acreate(name="route-node", last_heartbeat_at=timezone.now(),
                                      gpus=[{"index": 0, "name": "cpu", "total_mb": 8000, "free_mb": 8000}])
    instance = await Instance.objects.acreate(model=model, node=node, phase=Phase.READY, vram_mb=1000, port=port)
    return model, instance


async def test_a_ready_route_just_past_its_time_is_answered_at_once_and_looked_up_again_once(catalog_model):
    model, instance = await ready_on_port(catalog_model, 1111)
    assert (await gateway.ready_route(model)).base_url.endswith(":1111")
    await Instance.objects.filter(pk=instance.pk).aupdate(port=2222)  # the engine moved

    age(gateway._routes, model.model_id, gateway.ROUTE_TTL_S + 0.1)
    queries = []
    lookup = gateway._route_lookup

    async def counted(model):
        queries.append(model.model_id)
        return await lookup(model)

    gateway._route_lookup = counted
    try:
        first, second = await asyncio.gather(gateway.ready_route(model), gateway.ready_route(model))
        # Both answered from the cache, without waiting for the database...
        assert first.base_url.endswith(":1111") and second.base_url.endswith(":1111")
        await settled()
    finally:
        gateway._route_lookup = lookup
    assert queries == [model.model_id], "one lookup for both callers"
    # ...and the lookup they started put the new answer in place.
    assert (await gateway.ready_route(model)).base_url.endswith(":2222")


async def test_a_route_long_out_of_date_or_none_is_looked_up_before_it_is_used(catalog_model):
    model, instance = await ready_on_port(catalog_model, 1111)
    await gateway.ready_route(model)
    await Instance.objects.filter(pk=instance.pk).aupdate(port=2222)
    age(gateway._routes, model.model_id, gateway.ROUTE_TTL_S + refresh.STALE_FOR_S + 0.1)
    assert (await gateway.ready_route(model)).base_url.endswith(":2222")

    await Instance.objects.filter(pk=instance.pk).aupdate(phase=Phase.STOPPED)
    age(gateway._routes, model.model_id, gateway.ROUTE_TTL_S + 0.1)
    assert (await gateway.ready_route(model)).base_url.endswith(":2222")  # just past its time: at once
    await settled()
    assert await gateway.ready_route(model) is None
    await Instance.objects.filter(pk=instance.pk).aupdate(phase=Phase.READY)
    age(gateway._routes, model.model_id, gateway.ROUTE_TTL_S + 0.1)
    assert (await gateway.ready_route(model)).base_url.endswith(":2222"), "no engine was answered stale"


async def test_a_disabled_model_stops_being_offered_after_one_refresh(catalog_model):
    model = await sync_to_async(catalog_model)(model_id="cached-offer", vram_mb=1000)
    assert (await selectors.offered_model_aget(model.model_id)).pk == model.pk
    await CatalogModel.objects.filter(pk=model.pk).aupdate(enabled=False)
    age(selectors._offered_cache, model.model_id, selectors._OFFERED_TTL_S + 0.1)  # just past its time
    assert (await selectors.offered_model_aget(model.model_id)).pk == model.pk
    await settled()
    assert await selectors.offered_model_aget(model.model_id) is None
    await CatalogModel.objects.filter(pk=model.pk).aupdate(enabled=True)
    age(selectors._offered_cache, model.model_id, selectors._OFFERED_TTL_S + 0.1)
    assert (await selectors.offered_model_aget(model.model_id)).pk == model.pk, "no model was answered stale"


async def test_a_failed_refresh_is_logged_and_the_next_one_runs(caplog):
    calls = []

    async def failing():
        calls.append("failing")
        raise RuntimeError("database away")

    async def working():
        calls.append("working")

    with caplog.at_level(logging.WARNING, logger="porten.refresh"):
        refresh.refresh_soon("key", failing)
        refresh.refresh_soon("key", failing)  # one is running already: not started
        await settled()
        refresh.refresh_soon("key", working)
        await settled()
    assert calls == ["failing", "working"]
    assert "database away" in caplog.text
    assert "key" not in refresh._running


async def test_callers_that_find_an_entry_out_of_date_together_share_one_lookup():
    calls, release = [], asyncio.Event()

    async def lookup(value):
        calls.append(value)
        await release.wait()
        if value == "broken":
            raise RuntimeError("database away")
        return value

    callers = [asyncio.create_task(refresh.look_up_once("shared", lookup, "answer")) for _ in range(5)]
    await asyncio.sleep(0.01)
    callers[0].cancel()  # its client went away: the others still get their answer
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert calls == ["answer"], "one lookup for five callers"
    assert isinstance(results[0], asyncio.CancelledError) and results[1:] == ["answer"] * 4
    assert await refresh.look_up_once("shared", lookup, "again") == "again"  # the next one looks again
    # A lookup that fails fails for every caller who waited on it, and the next one runs.
    release.clear()
    failing = [asyncio.create_task(refresh.look_up_once("failing", lookup, "broken")) for _ in range(3)]
    await asyncio.sleep(0.01)
    release.set()
    outcomes = await asyncio.gather(*failing, return_exceptions=True)
    assert [str(outcome) for outcome in outcomes] == ["database away"] * 3
    assert calls == ["answer", "again", "broken"]
    # A caller who finds a background refresh running for the entry waits for that one.
    release.clear()
    refresh.refresh_soon("joined", lookup, "refreshed")
    joined = asyncio.create_task(refresh.look_up_once("joined", lookup, "not asked"))
    await asyncio.sleep(0.01)
    release.set()
    assert await joined == "refreshed" and calls[-1] == "refreshed"


async def test_a_burst_after_a_quiet_spell_looks_up_the_key_and_the_model_once(catalog_model, api_key):
    from django.test import RequestFactory

    from porten import auth

    model = await sync_to_async(catalog_model)(model_id="burst-model", vram_mb=1000)
    counted = {"key": 0, "model": 0}
    key_lookup, model_lookup = auth.api_key_afor, selectors._offered_lookup

    async def key_counted(raw_key):
        counted["key"] += 1
        return await key_lookup(raw_key)

    async def model_counted(model_id):
        counted["model"] += 1
        return await model_lookup(model_id)

    auth.api_key_afor, selectors._offered_lookup = key_counted, model_counted
    auth._key_cache.clear()
    selectors._offered_cache.pop(model.model_id, None)
    try:
        def request():
            return RequestFactory().post("/v1/chat/completions", HTTP_AUTHORIZATION=f"Bearer {api_key}")

        callers = await asyncio.gather(*[auth.authenticate_async(request()) for _ in range(8)])
        models = await asyncio.gather(*[selectors.offered_model_aget(model.model_id) for _ in range(8)])
    finally:
        auth.api_key_afor, selectors._offered_lookup = key_lookup, model_lookup
    assert all(isinstance(caller, auth.ApiKeyUser) for caller, _ in callers)
    assert {found.pk for found in models} == {model.pk}
    assert counted == {"key": 1, "model": 1}, counted

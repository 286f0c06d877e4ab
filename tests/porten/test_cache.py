"""Per-process caches: answered at once just past their time while one task looks again, one
lookup for callers that come together, negative answers never served stale."""
from __future__ import annotations

import asyncio
import logging

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from catalog import selectors
from catalog.models import CatalogModel
from fleet.gateway import warm
from fleet.models import Instance, Node, Phase
from porten import auth
from porten.cache import Cache, once


def age(cache: Cache, key, seconds: float) -> None:
    """Make the entry for `key` look `seconds` older (monotonic time moves on without sleeping)."""
    stamp, value = cache.entries[key]
    cache.entries[key] = (stamp - seconds, value)


async def settled() -> None:
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]:
            return


class Source:
    """A lookup whose answers the test sets, counting its calls."""

    def __init__(self) -> None:
        self.answers: dict = {}
        self.calls: list = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, key):
        self.calls.append(key)
        await self.release.wait()
        answer = self.answers.get(key)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_an_answer_just_past_its_time_is_served_at_once_and_looked_up_again_once():
    source = Source()
    cache = Cache("test-stale", source, ttl_s=1.0, stale_for_s=2.0)
    source.answers["k"] = "old"
    assert await cache.get("k") == "old"
    source.answers["k"] = "new"
    age(cache, "k", 1.1)
    assert await asyncio.gather(cache.get("k"), cache.get("k")) == ["old", "old"]
    await settled()
    assert source.calls == ["k", "k"], "one refresh for two callers"
    assert await cache.get("k") == "new"
    age(cache, "k", 1.0 + 2.0 + 0.1)  # too old to serve: looked up first
    source.answers["k"] = "newest"
    assert await cache.get("k") == "newest"


async def test_a_negative_answer_is_never_served_stale():
    source = Source()
    cache = Cache("test-negative", source, ttl_s=1.0)
    assert await cache.get("k") is None
    source.answers["k"] = "there now"
    age(cache, "k", 1.1)
    assert await cache.get("k") == "there now"


async def test_a_cache_that_keeps_no_negative_answers_looks_them_up_each_time():
    source = Source()
    cache = Cache("test-no-negative", source, ttl_s=10.0, keep_negative=False)
    assert await cache.get("new-key") is None
    source.answers["new-key"] = "created since"
    assert await cache.get("new-key") == "created since"
    assert source.calls == ["new-key", "new-key"]


async def test_callers_that_come_together_share_one_lookup_and_one_leaving_does_not_cancel_it():
    source = Source()
    source.answers["k"] = "answer"
    source.release.clear()
    cache = Cache("test-shared", source, ttl_s=1.0)
    callers = [asyncio.create_task(cache.get("k")) for _ in range(5)]
    await asyncio.sleep(0.01)
    callers[0].cancel()
    source.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert source.calls == ["k"]
    assert isinstance(results[0], asyncio.CancelledError) and results[1:] == ["answer"] * 4


async def test_a_failed_lookup_fails_its_callers_is_logged_without_the_key_and_the_next_one_runs(caplog):
    source = Source()
    source.answers["pt-secret"] = RuntimeError("database away")
    cache = Cache("test-failing", source, ttl_s=1.0)
    with caplog.at_level(logging.WARNING, logger="porten.cache"):
        outcomes = await asyncio.gather(cache.get("pt-secret"), cache.get("pt-secret"), return_exceptions=True)
        await settled()
    assert [str(o) for o in outcomes] == ["database away"] * 2
    assert "database away" in caplog.text and "pt-secret" not in caplog.text
    source.answers["pt-secret"] = "fine"
    assert await cache.get("pt-secret") == "fine"


async def test_once_shares_a_call_among_callers_that_come_together():
    calls = []
    release = asyncio.Event()

    async def work():
        calls.append(1)
        await release.wait()
        return len(calls)

    waiting = [asyncio.create_task(once("test-once", "k", work)) for _ in range(4)]
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*waiting) == [1, 1, 1, 1]
    assert await once("test-once", "k", work) == 2


@pytest.mark.django_db(transaction=True)
async def test_a_ready_route_moves_with_the_database_within_its_time(catalog_model):
    model = await sync_to_async(catalog_model)(model_id="cached-route", vram_mb=1000)
    node = await Node.objects.acreate(name="route-node", last_heartbeat_at=timezone.now(),
                                      gpus=[{"index": 0, "name": "cpu", "total_mb": 8000, "free_mb": 8000}])
    instance = await Instance.objects.acreate(model=model, node=node, phase=Phase.READY, vram_mb=1000, port=1111)
    assert (await warm.ready_route(model)).base_url.endswith(":1111")
    await Instance.objects.filter(pk=instance.pk).aupdate(port=2222)
    age(warm._routes, model, warm.ROUTE_TTL_S + 0.1)
    assert (await warm.ready_route(model)).base_url.endswith(":1111")  # just past its time: at once
    await settled()
    assert (await warm.ready_route(model)).base_url.endswith(":2222")
    await Instance.objects.filter(pk=instance.pk).aupdate(phase=Phase.STOPPED)
    age(warm._routes, model, warm.ROUTE_TTL_S + 0.1)
    await warm.ready_route(model)
    await settled()
    assert await warm.ready_route(model) is None


@pytest.mark.django_db(transaction=True)
async def test_a_disabled_model_stops_being_offered_after_one_refresh(catalog_model):
    model = await sync_to_async(catalog_model)(model_id="cached-offer", vram_mb=1000)
    assert (await selectors.offered_model_aget(model.model_id)).pk == model.pk
    await CatalogModel.objects.filter(pk=model.pk).aupdate(enabled=False)
    age(selectors._offered, model.model_id, selectors.OFFERED_TTL_S + 0.1)
    assert (await selectors.offered_model_aget(model.model_id)).pk == model.pk
    await settled()
    assert await selectors.offered_model_aget(model.model_id) is None


@pytest.mark.django_db(transaction=True)
async def test_a_burst_after_a_quiet_spell_looks_up_the_key_and_the_model_once(catalog_model, api_key):
    model = await sync_to_async(catalog_model)(model_id="burst-model", vram_mb=1000)
    counted = {"key": 0, "model": 0}
    key_lookup, model_lookup = auth._keys.lookup, selectors._offered.lookup

    async def key_counted(raw_key):
        counted["key"] += 1
        return await key_lookup(raw_key)

    async def model_counted(model_id):
        counted["model"] += 1
        return await model_lookup(model_id)

    auth._keys.lookup, selectors._offered.lookup = key_counted, model_counted
    try:
        users = await asyncio.gather(*[auth.api_key_user(api_key) for _ in range(8)])
        models = await asyncio.gather(*[selectors.offered_model_aget(model.model_id) for _ in range(8)])
    finally:
        auth._keys.lookup, selectors._offered.lookup = key_lookup, model_lookup
    assert all(isinstance(user, auth.ApiKeyUser) for user in users)
    assert {found.pk for found in models} == {model.pk}
    assert counted == {"key": 1, "model": 1}, counted

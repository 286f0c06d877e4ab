"""Eviction with a real worker: a small node memory budget, drains that let streams finish,
and idle unloads that keep the weights on disk."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from fleet.models import Instance, Phase
from tests.fleet.conftest import GGUF_NAME, MULTI_REPO, offered as _offered, wait_for_phase

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

HELLO = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def offered(model_id: str, **fields):
    return _offered(model_id, vram_mb=1024, **fields)


def test_requested_model_evicts_a_lower_demand_one_whose_stream_finishes_intact(
        live_hub, api_key, node_worker_factory, hf):
    node_worker_factory(PORTEN_NODE_MEMORY_MB="1500", PORTEN_DRAIN_DEADLINE_S="60")
    offered("first-model")
    offered("second-model", repo=MULTI_REPO)
    headers = {"Authorization": f"Bearer {api_key}"}
    url = live_hub.url + "/v1/chat/completions"

    async def scenario():
        async with httpx.AsyncClient(timeout=180) as http:
            first = await http.post(url, headers=headers, json={"model": "first-model", "messages": HELLO, "max_tokens": 2})
            assert first.status_code == 200, first.text
            chunks: list[str] = []

            async def stream_on_victim():
                async with http.stream("POST", url, headers=headers, json={
                        "model": "first-model", "messages": HELLO, "max_tokens": 120, "stream": True,
                        "temperature": 0}) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            chunks.append(line[6:])

            streaming = asyncio.create_task(stream_on_victim())
            await asyncio.sleep(0.5)  # the stream is under way on the model about to be evicted
            # Three users want the second model: its demand (3) passes the first's (2).
            seconds = await asyncio.gather(*[http.post(url, headers=headers, json={
                "model": "second-model", "messages": HELLO, "max_tokens": 4}) for _ in range(3)])
            await streaming
            return chunks, seconds

    chunks, seconds = asyncio.run(scenario())
    assert [r.status_code for r in seconds] == [200, 200, 200], [r.text for r in seconds]
    assert chunks[-1] == "[DONE]", "the stream on the victim completed"
    finish = [json.loads(c)["choices"][0].get("finish_reason") for c in chunks[:-1]]
    assert finish[-1] in {"length", "stop"}
    assert sum(1 for c in chunks[:-1] if json.loads(c)["choices"][0]["delta"].get("content")) > 10
    victim = Instance.objects.get(model__model_id="first-model")
    assert victim.phase == Phase.STOPPED, "the first model was drained and unloaded"
    second = Instance.objects.get(model__model_id="second-model")
    assert second.phase == Phase.READY
    assert second.waits_for == [victim.pk]
    assert "evict" in second.placement_reason and "first-model" in second.placement_reason
    assert victim.stopped_at <= second.ready_at


def test_a_higher_demand_model_is_not_evicted(live_hub, api_key, node_worker_factory, hf):
    node_worker_factory(PORTEN_NODE_MEMORY_MB="1500")
    offered("popular")
    offered("rare", repo=MULTI_REPO)
    headers = {"Authorization": f"Bearer {api_key}"}
    url = live_hub.url + "/v1/chat/completions"
    for _ in range(4):
        assert httpx.post(url, headers=headers, timeout=120,
                          json={"model": "popular", "messages": HELLO, "max_tokens": 1}).status_code == 200
    response = httpx.post(url, headers={**headers, "X-Porten-Warmup-Budget": "3"}, timeout=60,
                          json={"model": "rare", "messages": HELLO, "max_tokens": 1})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "fleet_busy"
    assert "demand" in response.json()["error"]["message"]
    assert Instance.objects.get(model__model_id="popular").phase == Phase.READY
    assert not Instance.objects.filter(model__model_id="rare").exists()


def test_a_waiting_request_ages_until_it_wins_room(live_hub, api_key, node_worker_factory, hf):
    node_worker_factory(PORTEN_NODE_MEMORY_MB="1500", PORTEN_DRAIN_DEADLINE_S="5")
    offered("busy-model")
    offered("patient-model", repo=MULTI_REPO)
    headers = {"Authorization": f"Bearer {api_key}"}
    url = live_hub.url + "/v1/chat/completions"
    for _ in range(3):
        assert httpx.post(url, headers=headers, timeout=120,
                          json={"model": "busy-model", "messages": HELLO, "max_tokens": 1}).status_code == 200
    started = time.monotonic()
    response = httpx.post(url, headers={**headers, "X-Porten-Warmup-Budget": "90"}, timeout=120,
                          json={"model": "patient-model", "messages": HELLO, "max_tokens": 1})
    waited = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert waited > 4, "it had to age past the busier model's demand first"
    assert Instance.objects.get(model__model_id="busy-model").phase == Phase.STOPPED


def test_idle_model_unloads_keeps_files_and_reloads_without_download(live_hub, api_key, node_worker_factory, hf):
    from fleet.tasks import unload_idle_instances

    worker = node_worker_factory(args=["--hub"], PORTEN_DEMAND_WINDOW_S="3")
    offered("idle-model")
    headers = {"Authorization": f"Bearer {api_key}"}
    url = live_hub.url + "/v1/chat/completions"
    body = {"model": "idle-model", "messages": HELLO, "max_tokens": 2}
    assert httpx.post(url, headers=headers, json=body, timeout=120).status_code == 200
    instance = Instance.objects.get(model__model_id="idle-model")

    assert unload_idle_instances.apply_async(queue="hub").get(timeout=30) == [], "not idle yet"
    time.sleep(4)
    assert unload_idle_instances.apply_async(queue="hub").get(timeout=30) == [instance.pk]
    wait_for_phase(instance.pk, {Phase.STOPPED}, timeout_s=30)
    store = Path(worker.env["PORTEN_MODEL_DIR"])
    assert any(p.name == GGUF_NAME for p in store.rglob("*.gguf")), "the weights stay on disk"

    hf.requests.clear()
    response = httpx.post(url, headers=headers, json=body, timeout=120)
    assert response.status_code == 200
    assert response.headers["x-porten-cold-start"] == "true"
    assert hf.get_count(GGUF_NAME) == 0, "the reload skips the download"
    assert Instance.objects.filter(model__model_id="idle-model", phase=Phase.READY).get().downloaded is False


def test_pinned_model_is_never_unloaded_for_idleness(node_worker_factory, hf, live_hub, api_key):
    from fleet.placement import instances_unload_idle

    node_worker_factory()
    offered("pinned-model", pinned=True)
    response = httpx.post(live_hub.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                          json={"model": "pinned-model", "messages": HELLO, "max_tokens": 1}, timeout=120)
    assert response.status_code == 200
    assert instances_unload_idle(now_s=time.time() + 10_000) == []
    assert Instance.objects.get(model__model_id="pinned-model").phase == Phase.READY

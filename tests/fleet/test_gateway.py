"""The /v1 gateway end to end: a live daphne hub, a real Celery node worker on real Redis,
huggingface_hub against the local endpoint, and a real llama.cpp engine."""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import openai
import pytest

from fleet.agent.engines.process import find_engine_processes
from fleet.models import Instance, Phase
from tests.fleet.conftest import BROKEN_REPO, GGUF_NAME, MULTI_REPO, offered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def client(live_hub, api_key):
    return openai.OpenAI(base_url=live_hub.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def test_cold_model_blocks_then_answers_and_then_is_warm(client, node_worker, hf):
    offered("gemma-gw")
    raw = client.chat.completions.with_raw_response.create(model="gemma-gw", messages=HELLO, max_tokens=12)
    reply = raw.parse()
    assert reply.choices[0].message.content.strip(), "real generated text"
    assert raw.headers["x-porten-cold-start"] == "true"
    assert float(raw.headers["x-porten-load-seconds"]) > 0
    assert raw.headers["x-porten-node"] == node_worker.name
    warm = client.chat.completions.with_raw_response.create(model="gemma-gw", messages=HELLO, max_tokens=4)
    assert warm.headers["x-porten-cold-start"] == "false"
    assert warm.headers["x-porten-node"] == node_worker.name
    assert "x-porten-load-seconds" not in warm.headers
    completion = client.completions.create(model="gemma-gw", prompt="Once upon a time", max_tokens=8)
    assert completion.choices[0].text.strip()
    assert Instance.objects.filter(model__model_id="gemma-gw").count() == 1


def test_cold_model_streams(client, node_worker, hf):
    offered("gemma-stream")
    stream = client.chat.completions.create(model="gemma-stream", messages=HELLO, max_tokens=16, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 2, "tokens arrive as separate chunks"
    assert "".join(pieces).strip()


def test_a_cold_stream_gets_its_headers_at_once_and_progress_comments_while_it_waits(
        live_hub, api_key, node_worker, hf):
    offered("gemma-cold-sse")
    hf.throttle_bytes_per_s = 60_000_000  # ~4 s of download: several keep-alive comments (1 s apart here)
    lines, started = [], time.monotonic()
    with httpx.stream("POST", live_hub.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": "gemma-cold-sse", "messages": HELLO, "max_tokens": 8, "stream": True},
                      timeout=180) as response:
        headers_after_s = time.monotonic() - started
        assert response.status_code == 200
        assert response.headers["x-porten-cold-start"] == "true"
        lines = [line for line in response.iter_lines() if line]
    assert headers_after_s < 1.5, "the headers do not wait for the load"
    comments = [line for line in lines if line.startswith(":")]
    assert any(line.startswith(": warming downloading") for line in comments), comments
    assert lines[-1] == "data: [DONE]"
    assert any(line.startswith("data: {") and '"content"' in line for line in lines)


def test_a_cold_stream_whose_load_outlasts_its_budget_ends_with_an_error_event(client, node_worker, hf):
    offered("gemma-cold-budget")
    hf.throttle_bytes_per_s = 40_000_000
    stream = client.chat.completions.create(model="gemma-cold-budget", messages=HELLO, max_tokens=8, stream=True,
                                            extra_headers={"X-Porten-Warmup-Budget": "1"})
    with pytest.raises(openai.APIError) as failed:
        list(stream)
    assert "warming up" in str(failed.value.message)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert exc.value.body["code"] == "model_not_found"


def test_budget_exceeded_is_503_model_warming_and_a_retry_succeeds(client, node_worker, hf):
    offered("gemma-slow")
    hf.throttle_bytes_per_s = 40_000_000  # ~6 s of download
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="gemma-slow", messages=HELLO, max_tokens=8,
                                       extra_headers={"X-Porten-Warmup-Budget": "1"})
    assert time.monotonic() - started < 5
    error = exc.value
    assert error.status_code == 503
    assert error.body["code"] == "model_warming"
    assert error.body["warming"]["phase"] in {"queued", "downloading"}
    assert int(error.response.headers["retry-after"]) >= 1
    # The load goes on without the client; a retry with the default budget finds it.
    reply = client.chat.completions.create(model="gemma-slow", messages=HELLO, max_tokens=8)
    assert reply.choices[0].message.content.strip()
    assert hf.get_count(GGUF_NAME) == 1


async def _cold_burst(url: str, key: str, model_id: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=n)) as http:
        return await asyncio.gather(*[
            http.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model_id, "messages": HELLO, "max_tokens": 4})
            for _ in range(n)
        ])


def test_fifty_concurrent_cold_requests_start_one_download_and_one_engine(live_hub, api_key, node_worker, hf):
    offered("gemma-herd")
    hf.throttle_bytes_per_s = 100_000_000
    responses = asyncio.run(_cold_burst(live_hub.url, api_key, "gemma-herd", 50))
    assert [r.status_code for r in responses] == [200] * 50, {r.text for r in responses if r.status_code != 200}
    assert all(r.json()["choices"][0]["message"]["content"] is not None for r in responses)
    assert hf.get_count(GGUF_NAME) == 1, "one download"
    assert Instance.objects.filter(model__model_id="gemma-herd").count() == 1, "one placement"
    assert len(find_engine_processes(node_worker.name)) == 1, "one engine"


def test_warm_model_stays_fast_while_cold_requests_wait(live_hub, api_key, node_worker, hf):
    offered("gemma-warm")
    offered("gemma-cold", repo=MULTI_REPO)
    headers = {"Authorization": f"Bearer {api_key}"}
    body = {"model": "gemma-warm", "messages": HELLO, "max_tokens": 2}
    assert httpx.post(live_hub.url + "/v1/chat/completions", json=body, headers=headers, timeout=120).status_code == 200

    def warm_latencies(count: int) -> list[float]:
        out = []
        for _ in range(count):
            t = time.perf_counter()
            assert httpx.post(live_hub.url + "/v1/chat/completions", json=body, headers=headers, timeout=60).status_code == 200
            out.append(time.perf_counter() - t)
        return out

    idle = statistics.median(warm_latencies(8))
    hf.throttle_bytes_per_s = 15_000_000  # the cold model takes ~20 s to download

    async def during() -> tuple[list[httpx.Response], list[float]]:
        async with httpx.AsyncClient(timeout=120) as http:
            cold = [asyncio.create_task(http.post(
                live_hub.url + "/v1/chat/completions", headers={**headers, "X-Porten-Warmup-Budget": "6"},
                json={"model": "gemma-cold", "messages": HELLO, "max_tokens": 2})) for _ in range(100)]
            await asyncio.sleep(1.0)
            latencies = await asyncio.to_thread(warm_latencies, 8)
            return await asyncio.gather(*cold), latencies

    cold_responses, busy = asyncio.run(during())
    assert {r.status_code for r in cold_responses} == {503}
    assert {r.json()["error"]["code"] for r in cold_responses} == {"model_warming"}
    assert statistics.median(busy) < 3 * idle + 0.5, (idle, busy)
    assert Instance.objects.get(model__model_id="gemma-cold").phase in {Phase.QUEUED, Phase.DOWNLOADING}


def test_model_no_node_can_fit_is_no_capacity_at_once(client, node_worker):
    offered("too-big", vram_mb=500_000)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="too-big", messages=HELLO)
    assert time.monotonic() - started < 5
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "no_capacity"
    assert "500,000" in exc.value.body["message"] and "4,096" in exc.value.body["message"]
    assert not Instance.objects.filter(model__model_id="too-big").exists()


def test_failed_load_wakes_waiters_at_once_with_the_reason(client, node_worker, hf):
    offered("broken-gw", repo=BROKEN_REPO, hf_files=["*.gguf"])
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="broken-gw", messages=HELLO, extra_headers={"X-Porten-Warmup-Budget": "120"})
    assert time.monotonic() - started < 30, "not left hanging until the budget"
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "model_load_failed"
    assert "exited before becoming healthy" in exc.value.body["message"]


def test_warming_endpoint_follows_a_load_without_a_key(live_hub, api_key, node_worker, hf):
    offered("gemma-watch")
    url = live_hub.url + "/public/v1/models/warming"
    idle = httpx.get(url, params={"model": "gemma-watch"}).json()
    assert idle == {**idle, "model": "gemma-watch", "ready": False, "phase": "idle", "pct": 0.0}
    hf.throttle_bytes_per_s = 50_000_000
    response = httpx.post(live_hub.url + "/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {api_key}", "X-Porten-Warmup-Budget": "0.5"},
                          json={"model": "gemma-watch", "messages": HELLO, "max_tokens": 2})
    assert response.status_code == 503
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = httpx.get(url, params={"model": "gemma-watch"}).json()
        assert set(state) >= {"model", "ready", "phase", "done_mb", "total_mb", "pct"}
        seen.append((state["phase"], state["pct"]))
        if state["ready"]:
            break
        time.sleep(0.2)
    phases = [p for p, _ in seen]
    assert phases[-1] == "ready"
    downloading = [pct for p, pct in seen if p == "downloading"]
    assert len(downloading) >= 3 and downloading == sorted(downloading) and downloading[-1] > downloading[0]
    assert httpx.get(url, params={"model": "nope"}).status_code == 404
    assert httpx.get(url).status_code == 400


def test_sixteen_concurrent_requests_to_a_one_slot_engine_all_come_back_whole(live_hub, api_key, node_worker, hf):
    offered("gemma-busy")
    url, headers = live_hub.url + "/v1/chat/completions", {"Authorization": f"Bearer {api_key}"}
    body = {"model": "gemma-busy", "messages": HELLO, "max_tokens": 12, "temperature": 0.8}
    assert httpx.post(url, headers=headers, json=body, timeout=180).status_code == 200  # warm

    async def streamed(http):
        async with http.stream("POST", url, headers=headers, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
            return response.headers, events

    async def plain(http):
        response = await http.post(url, headers=headers, json=body)
        return response.headers, response.json()

    async def burst():
        async with httpx.AsyncClient(timeout=300) as http:
            return await asyncio.gather(*[streamed(http) for _ in range(8)], *[plain(http) for _ in range(8)])

    answers = asyncio.run(burst())
    for _, events in answers[:8]:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).strip(), "content streamed"
        assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    for _, reply in answers[8:]:
        assert reply["choices"][0]["message"]["content"].strip()
        assert reply["choices"][0]["finish_reason"] in {"stop", "length"}
    assert sum("x-porten-queue-seconds" in h for h, _ in answers) >= 8, "the hub queued what the engine cannot serve"


def test_embeddings_load_on_demand_in_the_openai_shape(client, node_worker, hf):
    import math

    offered("gemma-embed", supports_embeddings=True, supports_chat=False)
    one = client.embeddings.create(model="gemma-embed", input="hello world")  # the client asks for base64
    assert len(one.data) == 1 and len(one.data[0].embedding) == 640  # Gemma 3 270M's hidden size
    assert math.isclose(math.sqrt(sum(v * v for v in one.data[0].embedding)), 1.0, rel_tol=1e-3)
    several = client.embeddings.create(model="gemma-embed", input=["hello world", "goodbye"], encoding_format="float")
    assert [d.index for d in several.data] == [0, 1]
    assert several.data[0].embedding != several.data[1].embedding
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(several.data[0].embedding, one.data[0].embedding))
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gemma-embed", messages=HELLO, max_tokens=2)
    assert refused.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad_input:
        client.embeddings.create(model="gemma-embed", input=[])
    assert bad_input.value.body["param"] == "input"


def test_an_engine_the_hub_cannot_reach_fails_with_a_reason_naming_the_address(live_hub, api_key, node_worker_factory,
                                                                                 hf):
    # The node's engines listen on one address while it tells the hub another: healthy to the node,
    # unreachable from the hub.
    node_worker_factory(PORTEN_NODE_ADDRESS="127.0.0.9", PORTEN_ENGINE_BIND="127.0.0.8")
    offered("gemma-unreachable")
    started = time.monotonic()
    reply = httpx.post(live_hub.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                       json={"model": "gemma-unreachable", "messages": HELLO, "max_tokens": 4}, timeout=120)
    assert reply.status_code in (502, 503), reply.text
    assert time.monotonic() - started < 60, "not a hang"
    failed = Instance.objects.filter(model__model_id="gemma-unreachable", phase=Phase.FAILED).latest("created_at")
    assert "127.0.0.9" in failed.last_error and "cannot reach" in failed.last_error
    shown = httpx.get(live_hub.url + "/public/v1/models/warming", params={"model": "gemma-unreachable"}).json()
    assert shown["phase"] in {"failed", "queued", "downloading", "loading", "ready"}

"""GET /metrics: the hub's per-request figures summed over its processes, the fleet's events counted in
Redis by node agents and the planner, and fleet state read at scrape time; the optional token."""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.metrics import ENGINE_LOAD_SECONDS, LOADS, FleetCollector, metric_count, metric_observe
from fleet.models import Instance, Phase
from fleet.placement import instances_unload_idle
from porten.redis import reset_clients
from tests.conftest import REPO_ROOT, hub_command, service_env, wait_for_http
from tests.fleet.conftest import (  # noqa: F401  (fixtures)
    gemma_gguf, hf, hf_hub, node_worker, node_worker_factory, offered, wait_for_phase,
)
from tests.services_plugin import free_port

HELLO = [{"role": "user", "content": "Say hello."}]
MB = 1024 * 1024


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text page: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def scrape(url: str, **headers: str) -> dict:
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


# --- the endpoint and its token -------------------------------------------------------------------

@pytest.mark.django_db
def test_metrics_are_open_by_default_and_want_the_token_once_it_is_set(client, settings):
    settings.PORTEN_METRICS_TOKEN = ""
    open_page = client.get("/metrics")
    assert open_page.status_code == 200
    found = samples(open_page.content.decode())
    assert value(found, "porten_metrics_source_up", source="database") == 1.0
    assert value(found, "porten_metrics_source_up", source="redis") == 1.0

    settings.PORTEN_METRICS_TOKEN = "s3cret-token"
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer wrong"}, {"HTTP_AUTHORIZATION": "s3cret-token"}):
        refused = client.get("/metrics", **headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_metrics_token"
        assert refused["WWW-Authenticate"] == "Bearer"
        assert b"porten_" not in refused.content
    allowed = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert allowed.status_code == 200
    assert b"porten_metrics_source_up" in allowed.content
    assert client.post("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token").status_code == 405


# --- fleet events in Redis --------------------------------------------------------------------------

@pytest.mark.django_db
def test_fleet_histograms_in_redis_come_out_cumulative():
    model = f"hist-{uuid.uuid4().hex[:8]}"
    for seconds in (0.2, 1.5, 1.7, 45.0, 9999.0):
        metric_observe(ENGINE_LOAD_SECONDS, seconds, model)
    found = {(s.name, frozenset(s.labels.items())): s.value
             for family in FleetCollector().collect() for s in family.samples}
    bucket = "porten_engine_load_seconds_bucket"
    assert value(found, bucket, model=model, le="0.5") == 1
    assert value(found, bucket, model=model, le="1.0") == 1
    assert value(found, bucket, model=model, le="2.0") == 3
    assert value(found, bucket, model=model, le="60.0") == 4
    assert value(found, bucket, model=model, le="600.0") == 4
    assert value(found, bucket, model=model, le="+Inf") == 5
    assert value(found, "porten_engine_load_seconds_count", model=model) == 5
    assert value(found, "porten_engine_load_seconds_sum", model=model) == pytest.approx(10047.4)


@pytest.mark.django_db
def test_redis_down_loses_fleet_events_quietly_and_the_scrape_still_answers(client, settings):
    handler_logger = logging.getLogger("fleet.metrics")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(level=logging.WARNING)
    handler_logger.addHandler(keep)
    reset_clients()
    redis_url = settings.REDIS_URL
    try:
        settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
        started = time.monotonic()
        for _ in range(3):
            metric_count(LOADS, "gemma", "node-a", "ready")  # must not raise
            metric_observe(ENGINE_LOAD_SECONDS, 1.0, "gemma")
        assert time.monotonic() - started < 5
        pages = [client.get("/metrics") for _ in range(2)]
    finally:
        settings.REDIS_URL = redis_url
        handler_logger.removeHandler(keep)
        reset_clients()
    assert len(records) == 2, f"an outage is logged once when recording, once when scraping: {records}"
    page = pages[-1]
    assert page.status_code == 200
    found = samples(page.content.decode())
    assert value(found, "porten_metrics_source_up", source="redis") == 0.0
    assert value(found, "porten_metrics_source_up", source="database") == 1.0
    # Redis back: events count again.
    model = f"back-{uuid.uuid4().hex[:8]}"
    metric_count(LOADS, model, "node-a", "ready")
    again = {(s.name, frozenset(s.labels.items())): s.value
             for family in FleetCollector().collect() for s in family.samples}
    assert value(again, "porten_loads_total", model=model, node="node-a", outcome="ready") == 1


# --- a cold request through the live hub and a real node ------------------------------------------

@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(300)
def test_a_cold_request_then_a_warm_stream_move_the_metrics(live_hub, api_key, node_worker, hf, gemma_gguf, settings):
    model = f"gemma-metrics-{uuid.uuid4().hex[:6]}"
    offered(model)
    headers = {"Authorization": f"Bearer {api_key}"}
    hf.throttle_bytes_per_s = 60_000_000  # ~4 s of download: long enough to see the request waiting
    answers: list[httpx.Response] = []
    cold = threading.Thread(target=lambda: answers.append(httpx.post(
        live_hub.url + "/v1/chat/completions", headers=headers, timeout=180,
        json={"model": model, "messages": HELLO, "max_tokens": 4})))
    cold.start()
    waiting_seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not waiting_seen:
        waiting_seen = value(scrape(live_hub.url), "porten_requests_waiting_for_load", model=model)
        time.sleep(0.1)
    cold.join(timeout=180)
    assert waiting_seen == 1.0, "the cold request was seen waiting for its load"
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert answers[0].headers["x-porten-cold-start"] == "true"

    lines = []
    with httpx.stream("POST", live_hub.url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": model, "messages": HELLO, "max_tokens": 4, "stream": True}) as stream:
        assert stream.headers["x-porten-cold-start"] == "false"
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"

    found = scrape(live_hub.url)
    node = node_worker.name
    assert value(found, "porten_requests_total", model=model, status="200", cold="true") == 1
    assert value(found, "porten_requests_total", model=model, status="200", cold="false") == 1
    assert value(found, "porten_requests_waiting_for_load", model=model) == 0
    cold_s = value(found, "porten_request_duration_seconds_sum", model=model, cold="true")
    warm_s = value(found, "porten_request_duration_seconds_sum", model=model, cold="false")
    assert cold_s > warm_s > 0, "the cold request waited for a download and an engine start"
    assert value(found, "porten_time_to_first_token_seconds_count", model=model, cold="false") == 1
    assert 0 < value(found, "porten_time_to_first_token_seconds_sum", model=model, cold="false") <= warm_s
    assert value(found, "porten_time_to_first_token_seconds_count", model=model, cold="true") is None, \
        "the cold request was not streamed"
    assert value(found, "porten_engine_queue_seconds_count", model=model) == 2
    # The node agent's events, counted in Redis, read at scrape time.
    assert value(found, "porten_loads_total", model=model, node=node, outcome="ready") == 1
    assert value(found, "porten_download_bytes_total", model=model, node=node) == gemma_gguf.stat().st_size
    assert value(found, "porten_download_seconds_count", model=model) == 1
    assert value(found, "porten_download_seconds_sum", model=model) > 1.0, "throttled to ~4 s"
    assert value(found, "porten_engine_load_seconds_count", model=model) == 1
    load_s = Instance.objects.get(model__model_id=model).load_seconds
    assert value(found, "porten_engine_load_seconds_sum", model=model) == pytest.approx(load_s, abs=0.01)
    # Fleet state read from the database and Redis.
    assert value(found, "porten_instances", model=model, node=node, phase="ready") == 1
    assert value(found, "porten_node_up", node=node) == 1
    assert value(found, "porten_node_memory_total_bytes", node=node, device="0", device_name="cpu") == 4096 * MB
    assert 0 <= value(found, "porten_node_memory_free_bytes", node=node, device="0", device_name="cpu") <= 4096 * MB
    assert value(found, "porten_model_demand_requests", model=model) >= 2
    assert value(found, "porten_model_demand_weighted", model=model) > 0

    # An idle unload is an eviction by reason.
    instance = Instance.objects.get(model__model_id=model)
    assert instance.pk in instances_unload_idle(now_s=time.time() + 10 * settings.PORTEN_DEMAND_WINDOW_S)
    wait_for_phase(instance.pk, {Phase.STOPPED}, timeout_s=60)
    found = scrape(live_hub.url)
    assert value(found, "porten_evictions_total", model=model, reason="idle") == 1
    assert value(found, "porten_instances", model=model, node=node, phase="ready") is None


# --- several hub processes ---------------------------------------------------------------------------

WRITER = """
import django
django.setup()
from porten.metrics import process_started, request_observe, waiting_for_load
process_started()
for _ in range(5):
    request_observe("", 401, False, 0.01, None)
waiting_for_load("model-of-a-dead-process").inc()
"""


async def _unauthorized_burst(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as http:
        responses = await asyncio.gather(*[
            http.post(url + "/v1/chat/completions", json={"model": "x", "messages": HELLO}) for _ in range(n)])
    return [r.status_code for r in responses]


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_every_hub_process_is_counted_and_a_dead_ones_live_gauges_drop_out(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = service_env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    port = free_port()
    log = tmp_path / "hub.log"
    with open(log, "ab") as out:
        hub = subprocess.Popen(hub_command("127.0.0.1", port, processes=2), cwd=REPO_ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/healthz", timeout_s=60, proc=hub, log=log)
        assert asyncio.run(_unauthorized_burst(url, 40)) == [401] * 40
        # Whichever process answers a scrape, it counts the requests every process served.
        for _ in range(6):
            assert value(scrape(url), "porten_requests_total", model="", status="401", cold="false") == 40
        # Another process writing into the same folder is summed in too; the live gauge of a process
        # that is gone is not.
        writer = subprocess.run([sys.executable, "-c", WRITER], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert writer.returncode == 0, writer.stderr
        found = scrape(url)
        assert value(found, "porten_requests_total", model="", status="401", cold="false") == 45
        assert value(found, "porten_requests_waiting_for_load", model="model-of-a-dead-process") in (None, 0.0)
        markers = sorted(p.name for p in metrics_dir.glob("porten-hub-*.pid"))
        assert len(markers) == 2, f"the two live hub processes keep their markers: {markers}"
    finally:
        hub.terminate()
        hub.wait(timeout=20)
    assert list(metrics_dir.glob("porten-hub-*.pid")) == [], "hub processes that stopped cleanly remove their markers"

"""The node agent for real: a Celery worker subprocess on real Redis, huggingface_hub against a local
endpoint, and a real llama.cpp engine running Gemma 3 270M."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from catalog.models import CatalogModel
from fleet.agent.engines.process import find_engine_processes, is_alive
from fleet.models import Instance, Node, Phase
from fleet.agent.services import instance_load
from fleet.dispatch import instance_enqueue_unload
from fleet.services import instance_create
from tests.factories import CatalogModelFactory
from tests.fleet.conftest import BROKEN_REPO, GEMMA_REPO, GGUF_NAME, MULTI_REPO, wait_for_phase

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

GEMMA_BYTES = 253_113_024


def gemma_model(repo: str = GEMMA_REPO, model_id: str = "gemma-test", **fields) -> CatalogModel:
    CatalogModel.objects.filter(model_id=model_id).delete()
    fields = {"context_length": 512, "vram_mb": 1024, **fields}
    return CatalogModelFactory(model_id=model_id, hf_repo=repo, hf_files=["*.gguf", "*.bin"], chat_format="gemma",
                               **fields)


def chat(instance: Instance) -> str:
    response = httpx.post(f"http://127.0.0.1:{instance.port}/v1/chat/completions", timeout=60, json={
        "model": instance.model.model_id, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16,
    })
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def test_load_download_progress_ready_chat_unload_reload(node_worker, hf, event_log):
    model = gemma_model()
    node = Node.objects.get(name=node_worker.name)
    events = event_log(model.model_id)
    hf.throttle_bytes_per_s = 80_000_000  # ~3 s of download, so progress is visible

    instance = instance_create(model=model, node=node, reason="test")
    instance = wait_for_phase(instance.pk, {Phase.READY, Phase.FAILED})
    assert instance.phase == Phase.READY, instance.last_error
    time.sleep(0.3)
    assert events.phases() == ["queued", "downloading", "loading", "ready"]
    progress = [e["bytes_done"] for e in events.events if e["phase"] == "downloading"]
    assert len(progress) >= 5, "progress is published while the bytes move, not only at the end"
    assert progress == sorted(set(progress)), "byte progress strictly increases"
    assert progress[-1] == GEMMA_BYTES and events.events[-1]["pct"] == 100.0
    assert {e["bytes_total"] for e in events.events if e["phase"] == "downloading" and e["bytes_done"]} == {GEMMA_BYTES}
    assert instance.downloaded and instance.load_seconds > 0 and instance.pid and instance.port
    assert chat(instance).strip(), "the engine generates real text"

    instance_enqueue_unload(instance)
    stopped = wait_for_phase(instance.pk, {Phase.STOPPED}, timeout_s=30)
    assert not is_alive(instance.pid)
    assert find_engine_processes(node_worker.name) == {}
    store = Path(node_worker.env["PORTEN_MODEL_DIR"])
    assert any(p.name == GGUF_NAME for p in store.rglob("*.gguf")), "weights stay on disk after unload"
    assert stopped.stopped_at is not None

    hf.requests.clear()
    again = wait_for_phase(instance_create(model=model, node=node).pk, {Phase.READY, Phase.FAILED})
    assert again.phase == Phase.READY, again.last_error
    assert again.downloaded is False
    assert hf.get_count(GGUF_NAME) == 0, "the second load does not download again"
    assert chat(again).strip()
    deadline = time.monotonic() + 10
    while Node.objects.get(pk=node.pk).engines != [{"instance": again.pk, "pid": again.pid}]:
        assert time.monotonic() < deadline, "the heartbeat reports the running engine"
        time.sleep(0.2)
    assert "gemma-test" in Node.objects.get(pk=node.pk).models_on_disk


def test_repeated_load_task_downloads_and_starts_once(node_worker, hf):
    from fleet.agent.tasks import load_instance

    model = gemma_model()
    node = Node.objects.get(name=node_worker.name)
    hf.throttle_bytes_per_s = 150_000_000
    instance = instance_create(model=model, node=node)
    for _ in range(3):  # redeliveries of the same message
        load_instance.apply_async(args=[instance.pk], queue=f"node.{node.name}")
    instance = wait_for_phase(instance.pk, {Phase.READY, Phase.FAILED})
    assert instance.phase == Phase.READY, instance.last_error
    time.sleep(1.0)
    assert hf.get_count(GGUF_NAME) == 1
    assert list(find_engine_processes(node_worker.name).values()) == [instance.pid]
    assert instance_load(instance_id=instance.pk) == "not-claimed"


def test_worker_killed_mid_download_resumes_without_refetching(node_worker, hf):
    model = gemma_model(repo=MULTI_REPO, model_id="gemma-multi")
    node = Node.objects.get(name=node_worker.name)
    hf.throttle_bytes_per_s = 40_000_000
    instance = instance_create(model=model, node=node)
    extras = 2 * 24 * 1024 * 1024
    deadline = time.monotonic() + 60
    while Instance.objects.get(pk=instance.pk).bytes_done < extras + 20_000_000:
        assert time.monotonic() < deadline, "download did not get past the extra files"
        time.sleep(0.05)
    node_worker.kill()
    assert Instance.objects.get(pk=instance.pk).phase == Phase.DOWNLOADING

    hf.throttle_bytes_per_s = None
    node_worker.start()
    instance = wait_for_phase(instance.pk, {Phase.READY, Phase.FAILED})
    assert instance.phase == Phase.READY, instance.last_error
    assert hf.get_count("a-extra-1.bin") == 1, "a file finished before the crash is not fetched again"
    assert hf.get_count("b-extra-2.bin") == 1
    assert hf.get_count(GGUF_NAME) == 2, "the interrupted file is fetched again"
    assert instance.bytes_done == instance.bytes_total == extras + GEMMA_BYTES


def test_engine_crash_after_ready_is_detected(node_worker, hf):
    model = gemma_model()
    instance = instance_create(model=model, node=Node.objects.get(name=node_worker.name))
    instance = wait_for_phase(instance.pk, {Phase.READY, Phase.FAILED})
    assert instance.phase == Phase.READY, instance.last_error
    os.kill(instance.pid, signal.SIGKILL)
    crashed_at = time.monotonic()
    failed = wait_for_phase(instance.pk, {Phase.FAILED}, timeout_s=15)
    assert time.monotonic() - crashed_at < 5, "a crash is noticed within a few seconds"
    assert "exited unexpectedly" in failed.last_error


def test_engine_that_cannot_start_fails_with_its_log(node_worker, hf):
    CatalogModel.objects.filter(model_id="broken").delete()
    model = CatalogModelFactory(model_id="broken", hf_repo=BROKEN_REPO, hf_files=["*.gguf"])
    instance = wait_for_phase(instance_create(model=model, node=Node.objects.get(name=node_worker.name)).pk,
                              {Phase.READY, Phase.FAILED})
    assert instance.phase == Phase.FAILED
    assert "exited before becoming healthy" in instance.last_error
    assert "broken.gguf" in instance.last_error or "load" in instance.last_error.lower(), instance.last_error
    assert find_engine_processes(node_worker.name) == {}


def test_unknown_repo_fails_with_a_clear_reason(node_worker, hf):
    CatalogModel.objects.filter(model_id="ghost").delete()
    model = CatalogModelFactory(model_id="ghost", hf_repo="porten-test/does-not-exist")
    instance = wait_for_phase(instance_create(model=model, node=Node.objects.get(name=node_worker.name)).pk,
                              {Phase.READY, Phase.FAILED}, timeout_s=60)
    assert instance.phase == Phase.FAILED
    assert "not found" in instance.last_error


def test_restarted_worker_adopts_its_ready_engine(node_worker, hf):
    model = gemma_model()
    instance = wait_for_phase(instance_create(model=model, node=Node.objects.get(name=node_worker.name)).pk,
                              {Phase.READY, Phase.FAILED})
    assert instance.phase == Phase.READY, instance.last_error
    node_worker.kill()
    node_worker.start()
    instance.refresh_from_db()
    assert instance.phase == Phase.READY
    assert find_engine_processes(node_worker.name) == {instance.pk: instance.pid}
    assert chat(instance).strip()


def test_a_long_context_load_stays_within_its_footprint(node_worker, hf):
    """Gemma 3 270M with a 32,768-token context: weights, KV cache and buffers stay under the
    footprint the planner reserves, after load and after a request (llama-cpp-python's default
    logits_all would ask for 32 GiB here and die)."""
    import psutil

    footprint_mb = 2048
    model = gemma_model(model_id="gemma-32k", context_length=32768, vram_mb=footprint_mb)
    instance = instance_create(model=model, node=Node.objects.get(name=node_worker.name))
    instance = wait_for_phase(instance.pk, {Phase.READY, Phase.FAILED})
    assert instance.phase == Phase.READY, instance.last_error
    engine = psutil.Process(instance.pid)
    after_load_mb = engine.memory_info().rss / 2**20
    assert chat(instance).strip() is not None
    after_request_mb = engine.memory_info().rss / 2**20
    assert after_load_mb <= footprint_mb and after_request_mb <= footprint_mb, (after_load_mb, after_request_mb)


def test_a_hung_engine_is_failed_by_its_liveness_check_and_the_next_request_loads_it_again(
        node_worker_factory, hf, live_hub, api_key):
    worker = node_worker_factory(PORTEN_LIVENESS_S="3")
    model = gemma_model(model_id="gemma-hang")
    instance = instance_create(model=model, node=Node.objects.get(name=worker.name))
    instance = wait_for_phase(instance.pk, {Phase.READY, Phase.FAILED})
    assert instance.phase == Phase.READY, instance.last_error
    # Busy generating for longer than the liveness limit: busy is not hung.
    started = time.monotonic()
    long = httpx.post(f"http://127.0.0.1:{instance.port}/v1/completions", timeout=120, json={
        "model": "gemma-hang", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 1.0,
        "stop": []})
    assert long.status_code == 200 and time.monotonic() - started > 4, "the answer took longer than the limit"
    assert Instance.objects.get(pk=instance.pk).phase == Phase.READY
    os.kill(instance.pid, signal.SIGSTOP)
    hung_at = time.monotonic()
    failed = wait_for_phase(instance.pk, {Phase.FAILED}, timeout_s=30)
    assert time.monotonic() - hung_at < 15
    assert "stopped answering" in failed.last_error
    assert not is_alive(instance.pid), "the hung engine is killed"
    reply = httpx.post(live_hub.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                       json={"model": "gemma-hang", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                       timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-porten-cold-start"] == "true"


def test_a_load_whose_message_was_lost_is_sent_again_and_runs_once(node_worker, hf):
    from datetime import timedelta

    from django.utils import timezone

    from fleet.placement import instances_requeue_lost

    model = gemma_model(model_id="gemma-lost")
    node = Node.objects.get(name=node_worker.name)
    # As if Redis went away (or the hub died) between the row's commit and the send: no message.
    instance = Instance.objects.create(model=model, node=node, phase=Phase.QUEUED, gpu_indices=[0],
                                       vram_mb=model.vram_mb)
    assert instances_requeue_lost() == [], "a load queued a moment ago is left to its message"
    Instance.objects.filter(pk=instance.pk).update(updated_at=timezone.now() - timedelta(seconds=120))
    assert instances_requeue_lost() == [instance.pk]
    assert instances_requeue_lost() == [], "sent again once, not on every sweep"
    instance = wait_for_phase(instance.pk, {Phase.READY, Phase.FAILED})
    assert instance.phase == Phase.READY, instance.last_error
    assert chat(instance).strip()

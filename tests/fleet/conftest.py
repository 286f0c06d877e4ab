"""Fleet fixtures: a local Hugging Face endpoint with the real small model, and real node workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, service_env
from tests.support.hf_endpoint import HFEndpoint
from tests.support.small_model import gemma_gguf_path, make_hf_repo

GEMMA_REPO = "porten-test/gemma-3-270m"
MULTI_REPO = "porten-test/gemma-multi"   # extra files before the GGUF, to watch resume after a crash
BROKEN_REPO = "porten-test/not-a-model"  # a "GGUF" llama.cpp cannot open
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def offered(model_id: str, repo: str = GEMMA_REPO, **fields):
    """A fresh catalog entry served from the local endpoint's `repo` (the real Gemma GGUF)."""
    from catalog.models import CatalogModel
    from tests.factories import CatalogModelFactory

    CatalogModel.objects.filter(model_id=model_id).delete()
    fields.setdefault("hf_files", ["*.gguf", "*.bin"])
    return CatalogModelFactory(model_id=model_id, hf_repo=repo, **fields)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    return gemma_gguf_path()


@pytest.fixture(scope="session")
def hf_hub(tmp_path_factory, gemma_gguf):
    root = tmp_path_factory.mktemp("hf-root")
    make_hf_repo(root, GEMMA_REPO, {GGUF_NAME: gemma_gguf, "README.md": "Gemma 3 270M for tests\n"})
    make_hf_repo(root, MULTI_REPO, {
        "a-extra-1.bin": os.urandom(24 * 1024 * 1024),
        "b-extra-2.bin": os.urandom(24 * 1024 * 1024),
        GGUF_NAME: gemma_gguf,
    })
    make_hf_repo(root, BROKEN_REPO, {"broken.gguf": b"GGUF this is not a real model file" * 1000})
    with HFEndpoint(root) as hub:
        yield hub


@pytest.fixture
def hf(hf_hub):
    """The session's endpoint with knobs and logs reset for this test."""
    hf_hub.throttle_bytes_per_s = None
    hf_hub.fail_after_bytes = None
    hf_hub.clear_faults()
    hf_hub.listing_without_sizes.clear()
    hf_hub.clear_requests()
    yield hf_hub
    hf_hub.throttle_bytes_per_s = None
    hf_hub.clear_faults()
    hf_hub.listing_without_sizes.clear()


class NodeWorker:
    """A real `manage.py node_worker` subprocess: this test's node."""

    def __init__(self, name: str, env: dict[str, str], log: Path, args: list[str] | None = None) -> None:
        self.name, self.env, self.log, self.args = name, env, log, args or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> "NodeWorker":
        from fleet.models import Node

        started_before = Node.objects.filter(name=self.name).values_list("agent_started_at", flat=True).first()
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "node_worker", "--concurrency", "4", "--loglevel", "INFO", *self.args],
            cwd=REPO_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node worker exited:\n{self.log.read_text()[-4000:]}")
            if "ready." in self.log.read_text():
                node_started = Node.objects.filter(name=self.name).values_list("agent_started_at", flat=True).first()
                if node_started and node_started != started_before:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"node worker not ready in {timeout_s} s:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        # A fresh "ready." must be seen after a restart.
        self.log.write_text("")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def make_node_worker(tmp_path: Path, hf_url: str, args: list[str] | None = None, **extra_env: str) -> NodeWorker:
    name = f"test-{uuid.uuid4().hex[:8]}"
    env = service_env(**{
        "PORTEN_NODE_NAME": name,
        "PORTEN_MODEL_DIR": str(tmp_path / "models"),
        "PORTEN_ENGINE_LOG_DIR": str(tmp_path / "engine-logs"),
        "PORTEN_NODE_MEMORY_MB": "4096",
        "PORTEN_SUPERVISE_S": "0.5",
        "PORTEN_HEARTBEAT_S": "2",
        "PORTEN_PROGRESS_INTERVAL_S": "0.1",
        "PORTEN_ENGINE_LOAD_TIMEOUT_S": "60",
        "HF_ENDPOINT": hf_url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "10",
        **extra_env,
    })
    return NodeWorker(name, env, tmp_path / f"worker-{name}.log", args)


@pytest.fixture
def node_worker_factory(transactional_db, tmp_path, hf):
    workers: list[NodeWorker] = []

    def factory(args: list[str] | None = None, **extra_env: str) -> NodeWorker:
        worker = make_node_worker(tmp_path, hf.url, args, **extra_env)
        workers.append(worker)
        return worker.start()

    yield factory
    from fleet.agent.engines.process import stop_all_engines

    # A worker stops once its running load is over: a download the test slowed or broke goes on at
    # full speed, so that the stop does not wait out the throttle.
    hf.throttle_bytes_per_s = None
    hf.clear_faults()
    for worker in workers:
        worker.stop()
        stop_all_engines(worker.name, grace_s=5)


@pytest.fixture
def node_worker(node_worker_factory) -> NodeWorker:
    return node_worker_factory()


class EventLog:
    """Every state the fleet publishes for one model, collected from Redis pub/sub."""

    def __init__(self, model_id: str) -> None:
        from fleet.live import WarmingState, events_channel
        from porten.redis import redis_client

        self.read = WarmingState.from_json
        self.events: list[dict] = []
        self._pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(events_channel(model_id))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message and message["type"] == "message":
                self.events.append(self.read(message["data"]).as_dict())

    def phases(self) -> list[str]:
        out: list[str] = []
        for event in self.events:
            if not out or out[-1] != event["phase"]:
                out.append(event["phase"])
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._pubsub.close()


@pytest.fixture
def event_log():
    logs: list[EventLog] = []

    def open_log(model_id: str) -> EventLog:
        log = EventLog(model_id)
        logs.append(log)
        return log

    yield open_log
    for log in logs:
        log.close()


def wait_for_phase(instance_id: int, phases: set[str], timeout_s: float = 120):
    from fleet.models import Instance

    deadline = time.monotonic() + timeout_s
    instance = None
    while time.monotonic() < deadline:
        instance = Instance.objects.select_related("model", "node").get(pk=instance_id)
        if instance.phase in phases:
            return instance
        time.sleep(0.1)
    raise AssertionError(f"instance {instance_id} stayed {instance.phase if instance else '?'}; wanted {phases}: "
                         f"{instance.last_error if instance else ''}")

"""A fleet on one machine: three real node agents as separate hosts (127.0.0.2-4, each its own
process, model store and memory budget), one hub (uvicorn), a hub Celery worker and beat, on the
test run's PostgreSQL and Redis, with real llama.cpp engines and the local Hugging Face endpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, hub_command, service_env, wait_for_http
from tests.fleet.conftest import NodeWorker, gemma_gguf, hf_hub, offered  # noqa: F401  (fixtures)
from tests.services_plugin import free_port

HEARTBEAT_S = 2.0
# name -> (address, memory budget MB): c is the only node that can ever hold the big model.
NODES = {"test-fleet-a": ("127.0.0.2", 6000), "test-fleet-b": ("127.0.0.3", 6000), "test-fleet-c": ("127.0.0.4", 12000)}
FLEET_ENV = {
    "PORTEN_HEARTBEAT_S": str(HEARTBEAT_S),
    "PORTEN_AUTOSCALE_S": "1",
    "PORTEN_SCALE_OUT_AFTER_S": "2",
    "PORTEN_DRAIN_DEADLINE_S": "20",
    "PORTEN_IDLE_SWEEP_S": "3600",  # no idle unloads while the suite runs
    "PORTEN_DEMAND_WINDOW_S": "20",  # replicas no longer needed go within seconds
}


class Fleet:
    def __init__(self, hub_url: str, workdir: Path, hf_url: str) -> None:
        self.hub_url, self.workdir, self.hf_url = hub_url, workdir, hf_url
        self.nodes: dict[str, NodeWorker] = {}
        self.procs: list[subprocess.Popen] = []

    def node_env(self, name: str, address: str, memory_mb: int, **extra: str) -> dict[str, str]:
        home = self.workdir / name
        return service_env(**FLEET_ENV, **{
            "PORTEN_NODE_NAME": name, "PORTEN_NODE_ADDRESS": address, "PORTEN_NODE_MEMORY_MB": str(memory_mb),
            "PORTEN_MODEL_DIR": str(home / "models"), "PORTEN_ENGINE_LOG_DIR": str(home / "engine-logs"),
            "PORTEN_SUPERVISE_S": "0.5", "PORTEN_PROGRESS_INTERVAL_S": "0.2", "PORTEN_ENGINE_LOAD_TIMEOUT_S": "60",
            "HF_ENDPOINT": self.hf_url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "5",
        }, **extra)

    def start_node(self, name: str) -> NodeWorker:
        address, memory_mb = NODES[name]
        log = self.workdir / f"worker-{name}.log"
        log.write_text("")
        worker = NodeWorker(name, self.node_env(name, address, memory_mb), log)
        self.nodes[name] = worker.start()
        return worker

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's agent and its engines, as a machine that loses power."""
        from fleet.agent.engines.process import find_engine_processes

        engines = find_engine_processes(name)
        self.nodes[name].kill()
        for pid in engines.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def django_db_setup(django_test_environment, django_db_blocker):
    """The test database, made whatever the tests' markers say: this suite's tests carry no
    django_db marker, whose per-test transaction or flush would hide or wipe the fleet's rows."""
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        old_config = setup_databases(verbosity=0, interactive=False)
    yield
    with django_db_blocker.unblock():
        teardown_databases(old_config, verbosity=0)


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def fleet(django_db_setup, django_db_blocker, hf_hub, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("fleet")
    env = service_env(**FLEET_ENV)
    port = free_port()
    fleet = Fleet(f"http://127.0.0.1:{port}", workdir, hf_hub.url)
    celery = [sys.executable, "-m", "celery", "-A", "porten"]
    fleet.procs.append(_start(hub_command("127.0.0.1", port), env, workdir / "hub.log"))
    fleet.procs.append(_start([*celery, "worker", "-Q", "hub", "-n", "hub@%h", "--pool", "threads",
                               "--concurrency", "2", "--without-gossip", "--without-mingle"], env,
                              workdir / "hub-worker.log"))
    fleet.procs.append(_start([*celery, "beat", "-s", str(workdir / "beat-schedule"), "--loglevel", "INFO"], env,
                              workdir / "beat.log"))
    with django_db_blocker.unblock():
        try:
            wait_for_http(fleet.hub_url + "/healthz", timeout_s=30, proc=fleet.procs[0], log=workdir / "hub.log")
            for name in NODES:
                fleet.start_node(name)
            yield fleet
        finally:
            from fleet.agent.engines.process import stop_all_engines

            for worker in fleet.nodes.values():
                worker.stop()
                stop_all_engines(worker.name, grace_s=5)
            for proc in fleet.procs:
                proc.terminate()
            for proc in fleet.procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def db_access(django_db_blocker):
    """The suite's rows outlive each test (the fleet is the module's): no per-test flush."""
    with django_db_blocker.unblock():
        yield


@pytest.fixture(scope="module")
def api_key(django_db_blocker):
    from porten.keys import api_key_create

    with django_db_blocker.unblock():
        return api_key_create(name="fleet")[1]


def chat(fleet: Fleet, key: str, model: str, *, max_tokens: int = 4, timeout_s: float = 180,
         budget_s: float | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if budget_s is not None:
        headers["X-Porten-Warmup-Budget"] = str(budget_s)
    return httpx.post(fleet.hub_url + "/v1/chat/completions", headers=headers,
                      json={"model": model, "messages": [{"role": "user", "content": "Hello"}],
                            "max_tokens": max_tokens}, timeout=timeout_s)


def eventually(check, *, timeout_s: float, every_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(every_s)

"""Shared fixtures: API keys, catalog rows, and a live hub (uvicorn) on the test database."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from porten.keys import api_key_create
from tests.factories import CatalogModelFactory
from tests.services_plugin import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

# The multi-node suite runs on PostgreSQL, in a run of its own (`make test` runs both).
collect_ignore = [] if os.environ.get("PORTEN_TEST_POSTGRES") == "1" else ["multinode"]


@pytest.fixture
def api_key(db) -> str:
    _, raw_key = api_key_create(name="test")
    return raw_key


@pytest.fixture
def auth_headers(api_key) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {api_key}"}


@pytest.fixture
def catalog_model(db):
    return CatalogModelFactory


def service_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess (hub, worker) that must share this test run's state."""
    from django.conf import settings

    env = dict(os.environ)
    database = settings.DATABASES["default"]
    env.update(DJANGO_SETTINGS_MODULE="porten.settings", PYTHONUNBUFFERED="1")
    if database["ENGINE"] == "django.db.backends.sqlite3":
        env["PORTEN_SQLITE_PATH"] = str(database["NAME"])
    else:  # the test database pytest-django made on the test run's PostgreSQL
        env["DATABASE_URL"] = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    env.update(extra)
    return env


def wait_for_http(url: str, *, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before answering {url}:\n{tail}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def hub_command(host: str, port: int, processes: int = 1) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "porten.asgi:application", "--host", host, "--port", str(port),
            "--workers", str(processes), "--loop", "uvloop", "--http", "httptools", "--lifespan", "on"]


class LiveHub:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log


@pytest.fixture(scope="session")
def live_hub(django_db_setup, django_db_blocker, tmp_path_factory):
    """The hub as `make run` starts it (uvicorn, here one process), on a free port, reading the test database."""
    port = free_port()
    log = tmp_path_factory.mktemp("hub") / "hub.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            hub_command("127.0.0.1", port),
            # Aging at 2 s (10 s by default) keeps the starvation test short. Its metrics files in a
            # folder of its own, as scripts/run.sh gives the hub.
            cwd=REPO_ROOT, env=service_env(PORTEN_BUSY_AGING_S="2", PORTEN_STREAM_KEEPALIVE_S="1",
                                           PROMETHEUS_MULTIPROC_DIR=str(tmp_path_factory.mktemp("hub-metrics"))),
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/healthz", timeout_s=30, proc=proc, log=log)
        yield LiveHub(url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(autouse=True)
def _fresh_process_caches():
    """Hot-path caches live per process; tests recreate rows with the same ids, so start clean."""
    from porten.cache import clear_caches

    clear_caches()
    yield


@pytest.fixture(scope="session", autouse=True)
def _no_engine_left_behind():
    """Every engine a test node started is stopped by the end of the run."""
    yield
    import psutil

    from fleet.agent.engines.process import ENGINE_ENV_NODE, stop_engine

    leftovers = []
    ours = os.environ["PORTEN_TEST_WORKDIR"]  # engines inherit it: another test run's are not ours
    for proc in psutil.process_iter(["pid"]):
        try:
            environ = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        node = environ.get(ENGINE_ENV_NODE, "")
        if node.startswith("test-") and environ.get("PORTEN_TEST_WORKDIR") == ours and proc.pid != os.getpid():
            leftovers.append((proc.pid, node))
            stop_engine(proc.pid, grace_s=2)
    assert not leftovers, f"engine processes left behind by the tests: {leftovers}"


@pytest.fixture(autouse=True)
async def _close_engine_connections():
    """Each test has a loop of its own: close the engine connections the gateway opened on it."""
    yield
    from fleet.gateway.engine_client import close_engine_session

    await close_engine_session()

"""Faults the fleet survives, each with real parts: the Hub endpoint failing mid-download, a mirror
that lists no sizes, the node's disk filling up, Redis killed and restarted under a load and a
stream, and the hub restarted during a load."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from catalog.models import CatalogModel
from fleet.models import Instance, Node, Phase
from fleet.services import instance_create
from tests.conftest import REPO_ROOT, hub_command, service_env, wait_for_http
from tests.factories import CatalogModelFactory
from tests.support.small_model import gemma_gguf_path
from tests.fleet.conftest import GEMMA_REPO, GGUF_NAME, MULTI_REPO, wait_for_phase
from tests.services_plugin import free_port, start_redis

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]

GEMMA_BYTES = 253_113_024
EXTRA_BYTES = 24 * 1024 * 1024  # each of the two extra files of MULTI_REPO
MB = 1024 * 1024


def gemma_model(model_id: str, repo: str = GEMMA_REPO) -> CatalogModel:
    CatalogModel.objects.filter(model_id=model_id).delete()
    return CatalogModelFactory(model_id=model_id, hf_repo=repo, hf_files=["*.gguf", "*.bin"], chat_format="gemma",
                               context_length=512, vram_mb=1024)


def chat(instance: Instance) -> str:
    response = httpx.post(f"http://127.0.0.1:{instance.port}/v1/chat/completions", timeout=60, json={
        "model": instance.model.model_id, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
    })
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


class RowWatch:
    """The instance row's (phase, bytes_done, bytes_total), read every 20 ms in a thread."""

    def __init__(self, instance_id: int) -> None:
        self.instance_id, self.seen = instance_id, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from django.db import connection

        try:
            while not self._stop.is_set():
                row = Instance.objects.filter(pk=self.instance_id).values_list(
                    "phase", "bytes_done", "bytes_total").first()
                if row:
                    self.seen.append(row)
                time.sleep(0.02)
        finally:
            connection.close()

    def stop(self) -> list[tuple[str, int, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.seen


def assert_never_backwards(values: list[int], what: str) -> None:
    backwards = [(a, b) for a, b in zip(values, values[1:]) if b < a]
    assert not backwards, f"{what} went backwards: {backwards[:5]}"


# --- the Hub endpoint failing ------------------------------------------------------------------

def test_hub_5xx_stall_and_reset_are_retried_with_backoff_and_progress_never_goes_back(
        node_worker_factory, hf, event_log):
    # The client gives up on a silent body after 2 s; huggingface_hub then resumes it with a Range.
    worker = node_worker_factory(HF_HUB_DOWNLOAD_TIMEOUT="2", PORTEN_DOWNLOAD_BACKOFF_MAX_S="1")
    model = gemma_model("gemma-flaky")
    events = event_log(model.model_id)
    hf.throttle_bytes_per_s = 150_000_000
    hf.fault(GGUF_NAME, "status", times=2, status=503)                       # GET 1, 2: 503
    hf.fault(GGUF_NAME, "stall", after_bytes=60 * MB, stall_s=4)            # GET 3: silent at 60 MiB
    hf.fault(GGUF_NAME, "reset", after_bytes=50 * MB)                       # GET 4 (the Range resume): RST

    instance = instance_create(model=model, node=Node.objects.get(name=worker.name))
    rows = RowWatch(instance.pk)
    instance = wait_for_phase(instance.pk, {Phase.READY, Phase.FAILED}, timeout_s=90)
    seen = rows.stop()
    assert instance.phase == Phase.READY, instance.last_error
    assert chat(instance).strip()

    assert [kind for kind, _, _ in hf.faults_hit] == ["status", "status", "stall", "reset"]
    gets = sorted((e for e in hf.log if e.method == "GET" and e.path.endswith(GGUF_NAME)), key=lambda e: e.started)
    assert [e.status for e in gets[:2]] == [503, 503]
    # Backoff: the store asks again after 0.5 s, then after 1 s.
    assert gets[1].started - gets[0].finished >= 0.45 and gets[2].started - gets[1].finished >= 0.95, \
        [(round(e.started, 2), round(e.finished, 2)) for e in gets]
    assert gets[3].range == f"bytes={60 * MB}-", "the stalled body is resumed where it stopped"
    assert gets[4].range is None and gets[4].status == 200, "after a reset the file is asked again"
    assert len(gets) == 5

    time.sleep(0.3)
    downloading = [e for e in events.events if e["phase"] == "downloading"]
    assert_never_backwards([e["bytes_done"] for e in downloading], "published bytes_done")
    assert_never_backwards([done for _, done, _ in seen], "the row's bytes_done")
    assert downloading[-1]["bytes_done"] == GEMMA_BYTES
    assert {e["bytes_total"] for e in downloading if e["bytes_done"]} == {GEMMA_BYTES}
    assert instance.bytes_done == instance.bytes_total == GEMMA_BYTES
    assert "try 2 of 6" in worker.log.read_text()


def test_hub_answering_5xx_past_the_retries_fails_the_load_with_the_reason(node_worker_factory, hf):
    worker = node_worker_factory(PORTEN_DOWNLOAD_BACKOFF_MAX_S="1")  # waits of 0.5, 1, 1, 1, 1 s
    model = gemma_model("gemma-down")
    hf.fault(GGUF_NAME, "status", times=100, status=502)
    instance = wait_for_phase(instance_create(model=model, node=Node.objects.get(name=worker.name)).pk,
                              {Phase.READY, Phase.FAILED}, timeout_s=60)
    assert instance.phase == Phase.FAILED
    assert f"download of {GGUF_NAME} from {GEMMA_REPO} failed after 6 tries" in instance.last_error
    assert "502" in instance.last_error
    assert hf.get_count(GGUF_NAME) == 6


# --- a mirror without sizes ----------------------------------------------------------------------

def test_listing_without_sizes_takes_each_size_as_its_download_starts(node_worker, hf, event_log):
    model = gemma_model("gemma-mirror", repo=MULTI_REPO)
    hf.listing_without_sizes.add(MULTI_REPO)
    hf.fault("b-extra-2.bin", "reset", after_bytes=8 * MB)  # a file whose size was learned is fetched again
    events = event_log(model.model_id)
    hf.throttle_bytes_per_s = 150_000_000

    instance = instance_create(model=model, node=Node.objects.get(name=node_worker.name))
    rows = RowWatch(instance.pk)
    instance = wait_for_phase(instance.pk, {Phase.READY, Phase.FAILED}, timeout_s=90)
    seen = rows.stop()
    assert instance.phase == Phase.READY, instance.last_error
    time.sleep(0.3)

    info = httpx.get(f"{hf.url}/api/models/{MULTI_REPO}/revision/main?blobs=true").json()
    assert all("size" not in sibling for sibling in info["siblings"]), "the mirror really lists no sizes"
    whole = 2 * EXTRA_BYTES + GEMMA_BYTES
    moving = [e for e in events.events if e["phase"] == "downloading" and e["bytes_done"]]
    assert moving and all(0 < e["bytes_done"] <= e["bytes_total"] for e in moving), "never a 0 total"
    totals = [e["bytes_total"] for e in moving]
    assert_never_backwards(totals, "bytes_total")
    assert_never_backwards([e["bytes_done"] for e in moving], "published bytes_done")
    assert totals[0] == EXTRA_BYTES, "the first file's size, as its download started"
    assert EXTRA_BYTES * 2 in totals and totals[-1] == whole
    assert [e for e in moving if e["pct"] == 100.0] == [moving[-1]], "100 % only once everything is in"
    assert_never_backwards([done for _, done, _ in seen], "the row's bytes_done")
    assert all(total for phase, done, total in seen if done), "the row never shows bytes over a 0 total"
    assert instance.bytes_done == instance.bytes_total == whole, "a size learned twice is counted once"
    assert hf.get_count("b-extra-2.bin") == 2


# --- the node's disk filling up ------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 600 MiB tmpfs as the node's model store: a real filesystem that really fills up."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a tmpfs mount for a disk that fills up (root in a container that allows it): "
                    f"{mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_disk(path: Path, *, leave_bytes: int) -> Path:
    """Take all but `leave_bytes` of the filesystem's free space, as another program would."""
    import shutil

    import errno

    filler = path / "filler"
    with open(filler, "wb") as out:
        for _ in range(20):
            try:
                os.posix_fallocate(out.fileno(), 0, out.seek(0, os.SEEK_END) + max(
                    0, shutil.disk_usage(path).free - leave_bytes))
                return filler
            except OSError as exc:  # a download in flight took some of it meanwhile: measure again
                if exc.errno != errno.ENOSPC:
                    raise
                time.sleep(0.01)
    raise AssertionError("could not fill the disk")


def test_disk_filling_up_fails_the_load_with_the_reason_and_spares_other_models(small_disk, node_worker_factory, hf):
    worker = node_worker_factory(PORTEN_MODEL_DIR=str(small_disk), PORTEN_NODE_MEMORY_MB="4096")
    node = Node.objects.get(name=worker.name)
    resident = wait_for_phase(instance_create(model=gemma_model("gemma-resident"), node=node).pk,
                              {Phase.READY, Phase.FAILED})
    assert resident.phase == Phase.READY, resident.last_error
    resident_files = sorted(p for p in small_disk.rglob("*") if p.is_file() and "gemma-3-270m" in str(p))
    multi = gemma_model("gemma-multi-big", repo=MULTI_REPO)
    hf.clear_requests()

    # Listed sizes that do not fit: refused before the first byte.
    filler = fill_disk(small_disk, leave_bytes=200 * MB)
    refused = wait_for_phase(instance_create(model=multi, node=node).pk, {Phase.READY, Phase.FAILED}, timeout_s=30)
    assert refused.phase == Phase.FAILED
    needed_mb = -(-(2 * EXTRA_BYTES + gemma_gguf_path().stat().st_size) // 1_000_000)  # MB of 10^6 bytes
    assert refused.last_error.startswith(f"not enough disk space on node {worker.name}: gemma-multi-big needs "
                                         f"{needed_mb} MB more in the model store"), refused.last_error
    assert hf.get_count("a-extra-1.bin") == 0 and hf.get_count(GGUF_NAME) == 0, "nothing was downloaded"
    filler.unlink()

    # They fit when the load starts; another program fills the disk while the weights come in.
    hf.throttle_bytes_per_s = 60_000_000
    failing = instance_create(model=multi, node=node)
    deadline = time.monotonic() + 30
    while Instance.objects.get(pk=failing.pk).bytes_done < 2 * EXTRA_BYTES + 20 * MB:
        assert time.monotonic() < deadline, "the download did not get into the GGUF"
        time.sleep(0.05)
    filler = fill_disk(small_disk, leave_bytes=2 * MB)
    failed = wait_for_phase(failing.pk, {Phase.READY, Phase.FAILED}, timeout_s=30)
    assert failed.phase == Phase.FAILED
    assert failed.last_error.startswith(f"not enough disk space on node {worker.name}: the model store {small_disk} "
                                        f"filled up while downloading {GGUF_NAME} of {MULTI_REPO}"), failed.last_error
    assert "the partial file was removed" in failed.last_error
    assert not list(small_disk.rglob("*.incomplete")), "no partial file is left behind"
    assert hf.get_count(GGUF_NAME) == 1, "a full disk is not retried"
    filler.unlink()

    # The model already on the node is untouched and goes on answering.
    assert Instance.objects.get(pk=resident.pk).phase == Phase.READY
    assert sorted(p for p in small_disk.rglob("*") if p.is_file() and "gemma-3-270m" in str(p)) == resident_files
    assert chat(resident).strip()
    assert Node.objects.get(pk=node.pk).models_on_disk == ["gemma-resident"]


# --- Redis and the hub going away -----------------------------------------------------------------

class Hub:
    """A hub process (uvicorn, one process) of this test's own, on a fixed port so a restart keeps its URL."""

    def __init__(self, log: Path, **env: str) -> None:
        self.port, self.log, self.env = free_port(), log, env
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Hub":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(hub_command("127.0.0.1", self.port), cwd=REPO_ROOT, stdout=out,
                                         stderr=subprocess.STDOUT,
                                         env=service_env(PORTEN_STREAM_KEEPALIVE_S="1", **self.env))
        wait_for_http(self.url + "/healthz", timeout_s=30, proc=self.proc, log=self.log)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def hub_factory(tmp_path):
    hubs: list[Hub] = []

    def factory(**env: str) -> Hub:
        hub = Hub(tmp_path / f"hub-{len(hubs)}.log", **env)
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        hub.stop()


class OwnRedis:
    """A Redis server of this test's own (the session's is shared by every test), to kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "OwnRedis":
        self.proc = start_redis(self.port, self.workdir)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path):
    redis = OwnRedis(tmp_path).start()
    yield redis
    redis.kill()


class Call:
    """One request to the hub in a thread; `result` is what came back (status, headers, body) or the error."""

    def __init__(self, url: str, api_key: str, model_id: str, *, stream: bool = False, budget_s: float = 90,
                 max_tokens: int = 8) -> None:
        self.result: tuple[int, dict, str] | BaseException | None = None
        self.first_part = threading.Event()
        self._args = (url, api_key, model_id, stream, budget_s, max_tokens)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        url, api_key, model_id, stream, budget_s, max_tokens = self._args
        body = {"model": model_id, "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": max_tokens, "stream": stream}
        headers = {"Authorization": f"Bearer {api_key}", "X-Porten-Warmup-Budget": str(budget_s)}
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers,
                              timeout=httpx.Timeout(budget_s + 30)) as response:
                parts = []
                for part in response.iter_text():
                    if part.startswith("data: {"):
                        self.first_part.set()
                    parts.append(part)
                self.result = (response.status_code, dict(response.headers), "".join(parts))
        except BaseException as exc:  # what the caller saw is the result
            self.result = exc
        finally:
            self.first_part.set()

    def wait(self, timeout_s: float) -> tuple[int, dict, str] | BaseException:
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive(), f"a request still hangs after {timeout_s} s"
        return self.result


def wait_for_status(url: str, status: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    answer = None
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url, timeout=5)
            if answer.status_code == status:
                return answer.json()
        except httpx.HTTPError as exc:
            answer = exc
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer {status} within {timeout_s} s: {answer}")


def wait_for_download(model_id: str, past_bytes: int, *calls: Call, timeout_s: float = 45) -> Instance:
    deadline = time.monotonic() + timeout_s
    instance = None
    while time.monotonic() < deadline:
        instance = Instance.objects.filter(model__model_id=model_id).order_by("-pk").first()
        if instance is not None and instance.bytes_done > past_bytes:
            return instance
        time.sleep(0.05)
    shown = (instance.phase, instance.bytes_done, instance.last_error) if instance else "no instance"
    raise AssertionError(f"{model_id} did not download past {past_bytes} bytes in {timeout_s} s: {shown}; "
                         f"requests: {[call.result for call in calls]}")


def stream_text(body: str) -> str:
    text = ""
    for line in body.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def test_redis_killed_during_a_cold_load_and_a_stream_everything_recovers_without_a_restart(
        own_redis, node_worker_factory, hub_factory, hf, api_key):
    worker = node_worker_factory(REDIS_URL=own_redis.url)
    hub = hub_factory(REDIS_URL=own_redis.url).start()
    gemma_model("gemma-redis")
    hf.throttle_bytes_per_s = 40_000_000  # ~6 s of download

    # A cold request and a cold stream wait for the load; Redis dies under them and comes back.
    plain = Call(hub.url, api_key, "gemma-redis")
    streamed = Call(hub.url, api_key, "gemma-redis", stream=True)
    loading = wait_for_download("gemma-redis", 40 * MB, plain, streamed)
    own_redis.kill()
    down = wait_for_status(hub.url + "/healthz", 503, timeout_s=5)
    assert down["redis"]["ok"] is False and down["database"]["ok"] is True
    before = Instance.objects.get(pk=loading.pk).bytes_done
    time.sleep(2.0)
    assert Instance.objects.get(pk=loading.pk).bytes_done > before, "the download goes on while Redis is down"
    own_redis.start()
    wait_for_status(hub.url + "/healthz", 200, timeout_s=10)

    status, headers, body = plain.wait(timeout_s=90)
    assert status == 200, body
    assert headers["x-porten-cold-start"] == "true"
    assert json.loads(body)["choices"][0]["message"]["content"].strip()
    status, headers, body = streamed.wait(timeout_s=60)
    assert status == 200 and body.rstrip().endswith("data: [DONE]"), body[-500:]
    assert stream_text(body).strip()
    assert Instance.objects.get(pk=loading.pk).phase == Phase.READY
    assert Instance.objects.filter(model__model_id="gemma-redis").count() == 1, "one load for every waiter"

    # A stream already flowing when Redis dies runs to its end.
    flowing = Call(hub.url, api_key, "gemma-redis", stream=True, max_tokens=120)
    assert flowing.first_part.wait(timeout=30)
    own_redis.kill()
    wait_for_status(hub.url + "/healthz", 503, timeout_s=5)
    status, _, body = flowing.wait(timeout_s=60)
    assert status == 200 and body.rstrip().endswith("data: [DONE]"), body[-500:]
    assert len(stream_text(body)) > 20, "the answer went on after Redis died"
    own_redis.start()
    wait_for_status(hub.url + "/healthz", 200, timeout_s=10)

    # The worker consumes its queue on the new Redis: a new cold model loads through it.
    hf.throttle_bytes_per_s = None
    gemma_model("gemma-redis-after")
    status, headers, body = Call(hub.url, api_key, "gemma-redis-after", budget_s=60).wait(timeout_s=90)
    assert status == 200, body
    assert headers["x-porten-node"] == worker.name


def test_hub_restarted_during_a_load_the_load_goes_on_and_new_requests_find_it(
        node_worker, hub_factory, hf, api_key):
    hub = hub_factory().start()
    gemma_model("gemma-hub-restart")
    hf.throttle_bytes_per_s = 40_000_000

    cut_off = Call(hub.url, api_key, "gemma-hub-restart")
    loading = wait_for_download("gemma-hub-restart", 30 * MB, cut_off)
    hub.kill()
    assert isinstance(cut_off.wait(timeout_s=10), httpx.HTTPError), "the caller saw its hub go away"
    hub.start()
    assert Instance.objects.get(pk=loading.pk).phase in (Phase.DOWNLOADING, Phase.LOADING, Phase.READY)

    status, headers, body = Call(hub.url, api_key, "gemma-hub-restart").wait(timeout_s=90)
    assert status == 200, body
    assert headers["x-porten-node"] == node_worker.name
    assert Instance.objects.filter(model__model_id="gemma-hub-restart").count() == 1, "the load was not placed again"
    assert Instance.objects.get(pk=loading.pk).phase == Phase.READY
    assert hf.get_count(GGUF_NAME) == 1, "the weights came down once"


def test_a_cold_request_while_redis_is_down_waits_for_it_and_past_its_budget_is_a_clear_503(
        own_redis, node_worker_factory, hub_factory, hf, api_key):
    worker = node_worker_factory(REDIS_URL=own_redis.url)
    hub = hub_factory(REDIS_URL=own_redis.url).start()
    gemma_model("gemma-no-redis")
    own_redis.kill()
    wait_for_status(hub.url + "/healthz", 503, timeout_s=5)

    # No load can start without Redis: a request whose budget runs out first gets a clear 503.
    started = time.monotonic()
    status, headers, body = Call(hub.url, api_key, "gemma-no-redis", budget_s=3).wait(timeout_s=30)
    assert status == 503, body
    assert time.monotonic() - started < 3 + 5, "answered when its budget ran out"
    error = json.loads(body)["error"]
    assert error["code"] == "fleet_unreachable" and "Redis" in error["message"], error
    assert "Traceback" not in body and "/" not in error["message"]
    assert headers["retry-after"].isdigit()
    assert not Instance.objects.filter(model__model_id="gemma-no-redis").exists(), "nothing placed"

    # A stream waiting with a longer budget is served once Redis is back, by one load.
    streamed = Call(hub.url, api_key, "gemma-no-redis", stream=True, budget_s=90)
    time.sleep(3)
    own_redis.start()
    status, headers, body = streamed.wait(timeout_s=120)
    assert status == 200 and body.rstrip().endswith("data: [DONE]"), body[-500:]
    assert stream_text(body).strip()
    assert headers["x-porten-cold-start"] == "true"
    assert list(Instance.objects.filter(model__model_id="gemma-no-redis").values_list("phase", "node__name")) == [
        (Phase.READY, worker.name)]

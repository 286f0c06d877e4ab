"""Engine command lines, the engine process helpers, and a real llama.cpp engine with Gemma 3 270M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from fleet.agent.engines import ENGINES, LlamaCppEngine, LlamaServerEngine, UnknownEngine, VllmEngine, engine_for
from fleet.agent.engines.base import Engine, EngineLaunch
from fleet.agent.engines.process import (
    ENGINE_ENV_INSTANCE,
    ENGINE_ENV_NODE,
    EngineStartError,
    find_engine_processes,
    free_port,
    is_alive,
    is_healthy,
    log_tail,
    start_engine,
    stop_all_engines,
    stop_engine,
    wait_until_healthy,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_launch(**overrides) -> EngineLaunch:
    fields = {
        "instance_id": 7,
        "node_name": "node-a",
        "served_model_name": "gemma-3-270m",
        "model_path": Path("/models/gemma.gguf"),
        "context_length": 512,
        "port": 8101,
    }
    return EngineLaunch(**(fields | overrides))


# --- registry ---------------------------------------------------------------------------------


def test_registry_maps_catalog_engine_names_to_classes():
    assert ENGINES == {"llamacpp": LlamaCppEngine, "vllm": VllmEngine}
    assert type(engine_for("llamacpp")) is LlamaCppEngine
    assert type(engine_for("llamacpp", llama_server_bin="/opt/llama-server")) is LlamaServerEngine
    assert engine_for("vllm", vllm_bin="/opt/vllm/bin/vllm").command(
        make_launch(gpu_indices=(0,), vram_mb=1000, gpu_total_mb=10_000)
    )[0] == "/opt/vllm/bin/vllm"


def test_unknown_engine_is_a_key_error_naming_it():
    with pytest.raises(KeyError) as excinfo:
        engine_for("tgi")
    assert isinstance(excinfo.value, UnknownEngine)
    assert "tgi" in str(excinfo.value)


def test_launch_rejects_nonsense():
    with pytest.raises(ValueError):
        make_launch(context_length=0)
    with pytest.raises(ValueError):
        make_launch(port=70_000)
    with pytest.raises(ValueError):
        make_launch(gpu_indices=(0, 0))
    assert make_launch(model_path="/m.gguf", gpu_indices=[1, 2]).gpu_indices == (1, 2)


# --- llama.cpp ----------------------------------------------------------------------------------


def test_llamacpp_python_server_command_on_cpu():
    engine = LlamaCppEngine()
    launch = make_launch(chat_format="gemma", extra_args=("--n_threads", "2"))
    assert engine.command(launch) == [
        sys.executable, "-m", "llama_cpp.server",
        "--model", "/models/gemma.gguf",
        "--host", "127.0.0.1",
        "--port", "8101",
        "--n_ctx", "512",
        "--model_alias", "gemma-3-270m",
        "--logits_all", "false",
        "--interrupt_requests", "false",
        "--chat_format", "gemma",
        "--n_threads", "2",
    ]
    assert engine.environment(launch)["CUDA_VISIBLE_DEVICES"] == ""
    assert engine.health_url(launch) == "http://127.0.0.1:8101/v1/models"


def test_llamacpp_python_server_offloads_every_layer_on_gpu_and_uses_model_template_by_default():
    engine = LlamaCppEngine()
    launch = make_launch(gpu_indices=(1,), host="0.0.0.0")
    argv = engine.command(launch)
    assert "--chat_format" not in argv
    assert argv[-2:] == ["--n_gpu_layers", "-1"]
    assert engine.memory_arguments(launch) == ["--n_gpu_layers", "-1"]
    assert engine.environment(launch)["CUDA_VISIBLE_DEVICES"] == "1"
    # Bound to every interface, checked through loopback.
    assert engine.health_url(launch) == "http://127.0.0.1:8101/v1/models"


def test_llama_server_binary_command():
    engine = engine_for("llamacpp", llama_server_bin="/opt/llama-server")
    cpu = make_launch(chat_format="gemma")
    assert engine.command(cpu) == [
        "/opt/llama-server",
        "-m", "/models/gemma.gguf",
        "--host", "127.0.0.1",
        "--port", "8101",
        "-c", "512",
        "--alias", "gemma-3-270m",
        "--parallel", "1",
        "--no-jinja", "--chat-template", "gemma",
    ]
    assert engine.slots(cpu) == 1
    four = engine_for("llamacpp", llama_server_bin="/opt/llama-server", llama_server_parallel=4)
    assert "--parallel" in (argv := four.command(cpu)) and argv[argv.index("--parallel") + 1] == "4"
    assert four.slots(cpu) == 4, "the gateway sends it as many requests at once as it has slots"
    gpu = make_launch(gpu_indices=(0, 1))
    assert engine.command(gpu)[-2:] == ["-ngl", "999"]
    assert "--no-jinja" not in engine.command(gpu)
    assert engine.environment(gpu) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert engine.health_url(cpu) == "http://127.0.0.1:8101/health"


# --- vLLM ---------------------------------------------------------------------------------------


def vllm_launch(**overrides) -> EngineLaunch:
    fields = {
        "served_model_name": "qwen2.5-coder-32b",
        "model_path": Path("/store/qwen"),
        "context_length": 32768,
        "gpu_indices": (0,),
        "gpu_total_mb": 80_000,
        "vram_mb": 20_000,
    }
    return make_launch(**(fields | overrides))


def utilization(argv: list[str]) -> str:
    return argv[argv.index("--gpu-memory-utilization") + 1]


def test_vllm_command_sizes_memory_to_the_footprint():
    engine = VllmEngine()
    launch = vllm_launch()
    assert engine.command(launch) == [
        "vllm", "serve", "/store/qwen",
        "--served-model-name", "qwen2.5-coder-32b",
        "--host", "127.0.0.1",
        "--port", "8101",
        "--max-model-len", "32768",
        "--gpu-memory-utilization", "0.25",
    ]
    assert engine.environment(launch) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert engine.health_url(launch) == "http://127.0.0.1:8101/health"


def test_vllm_utilization_rounds_up_and_clamps():
    engine = VllmEngine()
    # 20,001 / 80,000 = 0.2500125: rounding down would starve the model.
    assert utilization(engine.command(vllm_launch(vram_mb=20_001))) == "0.26"
    assert utilization(engine.command(vllm_launch(vram_mb=100))) == "0.05"
    assert utilization(engine.command(vllm_launch(vram_mb=79_000))) == "0.95"
    assert utilization(engine.command(vllm_launch(vram_mb=80_000))) == "0.95"


def test_two_vllm_models_share_one_gpu():
    engine = VllmEngine()
    first = vllm_launch(vram_mb=30_000, port=8101)
    second = vllm_launch(vram_mb=40_000, port=8102, served_model_name="llama-3.1-8b")
    shares = [float(utilization(engine.command(launch))) for launch in (first, second)]
    assert shares == [0.38, 0.5]
    assert sum(shares) <= 0.95
    assert engine.environment(first) == engine.environment(second) == {"CUDA_VISIBLE_DEVICES": "0"}


def test_vllm_tensor_parallel_splits_the_footprint():
    engine = VllmEngine()
    launch = vllm_launch(gpu_indices=(2, 3), vram_mb=120_000)
    argv = engine.command(launch)
    assert utilization(argv) == "0.75"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert engine.environment(launch) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert "--tensor-parallel-size" not in engine.command(vllm_launch())


def test_vllm_refuses_what_cannot_fit_or_has_no_gpu():
    engine = VllmEngine()
    with pytest.raises(ValueError, match="more than"):
        engine.command(vllm_launch(vram_mb=80_001))
    with pytest.raises(ValueError, match="more than"):
        engine.command(vllm_launch(gpu_indices=(0, 1), vram_mb=170_000))
    with pytest.raises(ValueError, match="GPU"):
        engine.command(vllm_launch(gpu_indices=()))
    with pytest.raises(ValueError, match="footprint"):
        engine.command(vllm_launch(vram_mb=0))


# --- process helpers with a fake engine ---------------------------------------------------------

# A stand-in server: the real engines need a model and seconds to load, these tests need neither.
FAKE_ENGINE = r'''
import json, os, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

mode, port = sys.argv[1], int(sys.argv[2])
if mode == "crash":
    print("fatal: cannot open model file /models/broken.gguf", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "silent":
    print("loading forever", flush=True)
    while True:
        time.sleep(1)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = None
if mode == "family":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
time.sleep(0.3)  # loading: the first health polls find nothing listening

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/v1/models":
            self.send_error(404)
            return
        body = json.dumps({
            "object": "list", "data": [],
            "instance": os.environ.get("PORTEN_ENGINE_INSTANCE"),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "child": child.pid if child else None,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

print("listening", flush=True)
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


class FakeEngine(Engine):
    name = "fake"
    health_path = "/v1/models"

    def __init__(self, mode: str = "serve") -> None:
        self.mode = mode

    def command(self, launch: EngineLaunch) -> list[str]:
        return [sys.executable, "-c", FAKE_ENGINE, self.mode, str(launch.port)]

    def memory_arguments(self, launch: EngineLaunch) -> list[str]:
        return []


@pytest.fixture
def node_name():
    """A node name no other test (or test run) uses; everything started under it is stopped after."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    stop_all_engines(name, grace_s=1.0)
    assert find_engine_processes(name) == {}


@pytest.fixture
def start(node_name, tmp_path):
    """start(engine, **launch fields) -> (launch, EngineProcess); stops every engine it started."""
    started = []

    def _start(engine: Engine, **overrides):
        launch = make_launch(node_name=node_name, port=free_port(), **overrides)
        proc = start_engine(engine, launch, log_path=tmp_path / f"engine-{launch.instance_id}.log")
        started.append(proc)
        return launch, proc

    yield _start
    for proc in started:
        stop_engine(proc.pid, grace_s=1.0)
        assert not is_alive(proc.pid)


def test_free_port_can_be_bound():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_engine_becomes_healthy_and_carries_node_and_instance_in_its_environment(start):
    engine = FakeEngine()
    launch, proc = start(engine, instance_id=11, gpu_indices=(1, 3))
    waited_s = wait_until_healthy(engine, launch, proc, timeout_s=20, poll_s=0.05)
    assert 0.2 < waited_s < 20
    assert proc.port == launch.port
    assert is_alive(proc.pid)
    assert is_healthy(engine.health_url(launch))
    body = httpx.get(engine.health_url(launch), trust_env=False).json()
    assert body["instance"] == "11"
    assert body["cuda"] == "1,3"
    environ = psutil.Process(proc.pid).environ()
    assert environ[ENGINE_ENV_NODE] == launch.node_name
    assert environ[ENGINE_ENV_INSTANCE] == "11"
    # Its own session: a signal to the worker's group does not reach it.
    assert os.getsid(proc.pid) == proc.pid
    assert "starting fake instance 11" in log_tail(proc.log_path)


def test_engine_that_exits_raises_with_its_last_words(start):
    engine = FakeEngine("crash")
    launch, proc = start(engine)
    with pytest.raises(EngineStartError) as excinfo:
        wait_until_healthy(engine, launch, proc, timeout_s=20, poll_s=0.05)
    assert "cannot open model file /models/broken.gguf" in str(excinfo.value)
    assert excinfo.value.exit_code == 3
    assert "exited" in excinfo.value.reason
    assert not is_alive(proc.pid)
    # Reaped, not left a zombie.
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE


def test_engine_that_never_answers_is_stopped_at_the_timeout(start):
    engine = FakeEngine("silent")
    launch, proc = start(engine)
    began = time.monotonic()
    with pytest.raises(EngineStartError) as excinfo:
        wait_until_healthy(engine, launch, proc, timeout_s=1.0, poll_s=0.1)
    assert 1.0 <= time.monotonic() - began < 8
    assert "within 1 s" in excinfo.value.reason
    assert "loading forever" in str(excinfo.value)
    assert not is_alive(proc.pid)


def test_aborted_wait_stops_the_engine(start):
    engine = FakeEngine("silent")
    launch, proc = start(engine)
    with pytest.raises(EngineStartError, match="aborted"):
        wait_until_healthy(engine, launch, proc, timeout_s=30, poll_s=0.05, should_abort=lambda: True)
    assert not is_alive(proc.pid)


def test_missing_binary_is_a_start_error(node_name, tmp_path):
    class Missing(FakeEngine):
        def command(self, launch):
            return ["/nonexistent/porten-engine"]

    log_path = tmp_path / "missing.log"
    with pytest.raises(EngineStartError, match="could not start"):
        start_engine(Missing(), make_launch(node_name=node_name), log_path=log_path)
    assert "could not start" in log_tail(log_path)


def test_stop_engine_kills_an_engine_that_ignores_sigterm(start):
    engine = FakeEngine("stubborn")
    launch, proc = start(engine)
    wait_until_healthy(engine, launch, proc, timeout_s=20, poll_s=0.05)
    began = time.monotonic()
    stop_engine(proc.pid, grace_s=0.5)
    assert 0.5 <= time.monotonic() - began < 6
    assert not is_alive(proc.pid)
    assert not is_healthy(engine.health_url(launch), timeout_s=0.5)
    stop_engine(proc.pid, grace_s=0.5)  # gone: a no-op


def test_stop_engine_takes_the_engines_children_with_it(start, node_name):
    engine = FakeEngine("family")
    launch, proc = start(engine, instance_id=5)
    wait_until_healthy(engine, launch, proc, timeout_s=20, poll_s=0.05)
    child_pid = httpx.get(engine.health_url(launch), trust_env=False).json()["child"]
    assert is_alive(child_pid)
    # The child inherits the engine's environment; the engine itself is what is reported.
    assert find_engine_processes(node_name) == {5: proc.pid}
    stop_engine(proc.pid, grace_s=2.0)
    assert not is_alive(proc.pid)
    deadline = time.monotonic() + 5
    while is_alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(child_pid)


def test_is_alive_and_is_healthy_for_nothing():
    finished = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert finished.returncode == 0
    assert not is_alive(0)
    assert not is_alive(-1)
    assert not is_healthy(f"http://127.0.0.1:{free_port()}/health", timeout_s=0.5)


ORPHANING_WORKER = r'''
import sys
from pathlib import Path
from fleet.agent.engines.base import Engine, EngineLaunch
from fleet.agent.engines.process import start_engine

script, node, instance_id, port, log_path = sys.argv[1:]

class Fake(Engine):
    name = "fake"
    health_path = "/v1/models"
    def command(self, launch):
        return [sys.executable, "-c", script, "serve", str(launch.port)]
    def memory_arguments(self, launch):
        return []

launch = EngineLaunch(instance_id=int(instance_id), node_name=node, served_model_name="m",
                      model_path=Path("/m.gguf"), context_length=512, port=int(port))
print(start_engine(Fake(), launch, log_path=Path(log_path)).pid)
'''


def test_a_restarted_worker_finds_and_stops_engines_its_predecessor_left(node_name, tmp_path):
    ports = [free_port(), free_port()]
    pids = []
    for instance_id, port in zip((21, 22), ports):
        # The worker that starts the engine exits at once, as a crashed or restarted worker would.
        worker = subprocess.run(
            [sys.executable, "-c", ORPHANING_WORKER, FAKE_ENGINE, node_name, str(instance_id),
             str(port), str(tmp_path / f"{instance_id}.log")],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True, text=True, timeout=30, check=True,
        )
        pids.append(int(worker.stdout.strip()))
    for port in ports:
        deadline = time.monotonic() + 20
        while not is_healthy(f"http://127.0.0.1:{port}/v1/models", timeout_s=0.5):
            assert time.monotonic() < deadline, log_tail(tmp_path / "21.log")
            time.sleep(0.05)

    assert find_engine_processes(node_name) == {21: pids[0], 22: pids[1]}
    assert find_engine_processes(f"other-{node_name}") == {}

    assert stop_all_engines(node_name, grace_s=2.0) == [21, 22]
    # Not our children: whoever inherited them may leave zombies, which count as dead.
    assert not any(is_alive(pid) for pid in pids)
    assert find_engine_processes(node_name) == {}


def test_log_tail(tmp_path):
    log = tmp_path / "engine.log"
    assert log_tail(log) == ""
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(log, lines=3) == "line 97\nline 98\nline 99"
    log.write_bytes(b"bad \xff byte\nlast")
    assert log_tail(log, lines=5) == "bad \ufffd byte\nlast"


# --- the real engine ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The real Gemma 3 270M GGUF, assembled once into a cache shared by test runs."""
    from tests.support.small_model import gemma_gguf_path

    return gemma_gguf_path()


def test_real_llamacpp_engine_serves_gemma(gemma_gguf, start, node_name):
    import llama_cpp.server  # noqa: F401  (a missing engine is a failure, not a skip)
    engine = engine_for("llamacpp")
    launch, proc = start(
        engine, model_path=gemma_gguf, served_model_name="gemma-3-270m", chat_format="gemma",
        context_length=512,
    )
    wait_until_healthy(engine, launch, proc, timeout_s=60)
    assert find_engine_processes(node_name) == {launch.instance_id: proc.pid}

    models = httpx.get(f"{engine.base_url(launch)}/models", trust_env=False, timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["gemma-3-270m"]
    response = httpx.post(
        f"{engine.base_url(launch)}/chat/completions",
        json={
            "model": launch.served_model_name,
            "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
            "max_tokens": 16,
        },
        trust_env=False,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["choices"][0]["message"]["content"].strip(), json.dumps(reply)
    assert 0 < reply["usage"]["completion_tokens"] <= 16

    stop_engine(proc.pid, grace_s=engine.stop_grace_s)
    assert not is_alive(proc.pid)
    assert find_engine_processes(node_name) == {}
    assert not is_healthy(engine.health_url(launch), timeout_s=0.5)

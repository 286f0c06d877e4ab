"""A cold chat request's timeline through Porten, against the same llama.cpp engine started by hand and asked directly.

    .venv/bin/python bench/cold_start.py [--local-runs 3] [--hand-runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness import REPO, Stack, free_port

MODEL_ID = "gemma-cold"
HF_REPO = "bench/gemma-3-270m"
CONTEXT_LENGTH = 2048
MAX_TOKENS = 8
TARGET_SHARE_S = 0.30
OBSERVE_POLL_S = 0.01


def chat_body(content: str) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "stream": True}


BODY = chat_body("Hello")
# Sent before each warm measurement, so the engine's prompt cache never holds BODY's prompt.
OTHER_PROMPTS = ["Name a colour.", "Count to three.", "Say something kind.", "What is rain?", "Pick a fruit.",
                 "Describe a cat."]


@dataclass
class Answer:
    """One streamed request as the client saw it (time.time() seconds)."""
    sent: float
    head: float
    first_byte: float
    last_byte: float
    status: int
    headers: dict[str, str]


def streamed_request(url: str, api_key: str | None, body: dict = BODY) -> Answer:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=httpx.Timeout(300.0, connect=5.0), trust_env=False) as client:
        sent = time.time()
        with client.stream("POST", url, json=body, headers=headers) as response:
            head = time.time()
            first = None
            for part in response.iter_raw():
                if part and first is None:
                    first = time.time()
            last = time.time()
    return Answer(sent, head, first or last, last, response.status_code, dict(response.headers))


def process_started_at(pid: int) -> float | None:
    """When process `pid` started, on the time.time() clock (to a clock tick, 10 ms)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    since_boot_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot_s)


def first_healthy_at(url: str, timeout_s: float = 60) -> float | None:
    """When `url` first answers 200, polled every OBSERVE_POLL_S."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=httpx.Timeout(2.0, connect=0.5), trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                if client.get(url).status_code == 200:
                    return time.time()
            except httpx.HTTPError:
                pass
            time.sleep(OBSERVE_POLL_S)
    return None


class FleetWatch:
    """When this process heard each published phase of the model (Redis pub/sub), per instance; and,
    once an instance's engine is spawned, when its process started and when it first answered its
    health check (polled here every OBSERVE_POLL_S, independently of the node agent's own poll)."""

    def __init__(self, model_id: str) -> None:
        from fleet.live import events_channel
        from porten.redis import redis_client

        self.heard: dict[tuple[int | None, str], float] = {}
        self.engine: dict[int, dict[str, float | None]] = {}
        self.pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(events_channel(model_id))
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            message = self.pubsub.get_message(timeout=0.05)
            if message and message["type"] == "message":
                at = time.time()
                state = json.loads(message["data"])
                key = (state.get("instance"), state["phase"])
                if key in self.heard:
                    continue
                self.heard[key] = at
                if state["phase"] == "loading" and state.get("instance"):
                    threading.Thread(target=self._observe_engine, args=(state["instance"],), daemon=True).start()

    def _observe_engine(self, instance_id: int) -> None:
        from django.db import close_old_connections

        from fleet.models import Instance

        try:
            # The node writes pid and port, then publishes "loading": the row already has them.
            pid, port, address = Instance.objects.filter(pk=instance_id).values_list(
                "pid", "port", "node__address").get()
            if pid is None or port is None:
                return
            seen = self.engine[instance_id] = {"process_started": process_started_at(pid), "answers": None}
            seen["answers"] = first_healthy_at(f"http://{address}:{port}/v1/models")
        finally:
            close_old_connections()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2)
        self.pubsub.close()


@dataclass
class ColdRun:
    label: str
    answer: Answer
    instance: object  # fleet.models.Instance, read after the answer
    heard: dict[str, float] = field(default_factory=dict)
    engine: dict[str, float | None] = field(default_factory=dict)

    def points(self) -> dict[str, float | None]:
        """The timeline, in seconds from the client's send."""
        i, a = self.instance, self.answer
        started = i.started_at.timestamp() if i.started_at else None
        ready = i.ready_at.timestamp() if i.ready_at else None
        absolute = {
            "arrival (client sends)": a.sent,
            "placement (created_at)": i.created_at.timestamp(),
            "node picks up (started_at)": started,
            "download start": started,
            "download end": None if started is None or i.download_seconds is None else started + i.download_seconds,
            "engine process started (/proc)": self.engine.get("process_started"),
            "engine spawn (ready_at - load_seconds)": None if ready is None or i.load_seconds is None
            else ready - i.load_seconds,
            "engine answers health (10 ms poll)": self.engine.get("answers"),
            "engine healthy (ready_at)": ready,
            "'ready' heard on Redis": self.heard.get("ready"),
            "answer head at the client": a.head,
            "first byte at the client": a.first_byte,
            "last byte at the client": a.last_byte,
        }
        return {name: None if at is None else at - a.sent for name, at in absolute.items()}

    @property
    def ttfb_s(self) -> float:
        return self.answer.first_byte - self.answer.sent

    @property
    def download_s(self) -> float:
        return self.instance.download_seconds or 0.0


@dataclass
class HandRun:
    spawn_to_healthy_s: float  # Popen to the first 200 of the health check, polled every OBSERVE_POLL_S
    first_head_s: float        # the engine's first request after it became healthy: its answer's head
    first_ttfb_s: float        # ... and its first byte
    warm_ttfb_s: float         # median over later requests of the same body (not in the prompt cache)


class NodeWorker:
    """`manage.py node_worker --concurrency 4` as a subprocess, with the stack's environment."""

    def __init__(self, stack: Stack, hf_url: str) -> None:
        self.name = f"bench-cold-{uuid.uuid4().hex[:6]}"
        self.log = stack.workdir / "node-worker.log"
        self.env = {**stack.env, "PORTEN_NODE_NAME": self.name, "PORTEN_MODEL_DIR": str(stack.workdir / "models"),
                    "PORTEN_ENGINE_LOG_DIR": str(stack.workdir / "engine-logs"), "PORTEN_NODE_MEMORY_MB": "4096",
                    "HF_ENDPOINT": hf_url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                    "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        from fleet.models import Node

        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "node_worker", "--concurrency", "4", "--loglevel", "INFO"],
            cwd=REPO, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node worker exited:\n{self.log.read_text()[-3000:]}")
            if "ready." in self.log.read_text() and Node.objects.filter(name=self.name).exists():
                return
            time.sleep(0.1)
        raise RuntimeError(f"node worker not ready in {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def offer_model() -> None:
    """The catalog entry, as an operator would add it: weights from the (local) Hub, no instance yet."""
    from catalog.models import CatalogModel

    CatalogModel.objects.create(
        model_id=MODEL_ID, display_name="Gemma 3 270M (cold-start bench)", hf_repo=HF_REPO, hf_revision="main",
        hf_files=["*.gguf"], weight_format="gguf", engine="llamacpp", chat_format="gemma",
        context_length=CONTEXT_LENGTH, vram_mb=1024, disk_mb=242)


def wait_for_phase(instance_id: int, phases: set[str], timeout_s: float = 60):
    from fleet.models import Instance

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        instance = Instance.objects.select_related("model", "node").get(pk=instance_id)
        if instance.phase in phases:
            return instance
        time.sleep(0.05)
    raise RuntimeError(f"instance {instance_id} stayed {instance.phase}, not {phases}: {instance.last_error}")


def cold_request(label: str, hub: str, api_key: str, watch: FleetWatch) -> ColdRun:
    from fleet.models import Instance

    answer = streamed_request(hub + "/v1/chat/completions", api_key)
    if answer.status != 200:
        raise RuntimeError(f"{label}: HTTP {answer.status}")
    instance = Instance.objects.filter(model__model_id=MODEL_ID).order_by("-created_at").first()
    time.sleep(0.1)  # the last events may still be on their way to the listener
    heard = {phase: at for (instance_id, phase), at in watch.heard.items() if instance_id == instance.pk}
    return ColdRun(label, answer, instance, heard, dict(watch.engine.get(instance.pk, {})))


def unload(instance) -> None:
    """Stop the engine, keep the weights (the node's unload task), then let the hub's route cache
    (1 s, answered stale for 2 s more) forget the engine, as it has long forgotten after an idle unload."""
    from fleet.dispatch import instance_enqueue_unload

    instance_enqueue_unload(instance)
    wait_for_phase(instance.pk, {"stopped"})
    time.sleep(3.5)


def by_hand(model_path: Path, workdir: Path, node_name: str, runs: int, warm_requests: int = 5) -> list[HandRun]:
    """The same engine and model file, started the way the node agent starts it, asked directly."""
    from fleet.agent.engines import engine_for
    from fleet.agent.engines.base import EngineLaunch
    from fleet.agent.engines.process import start_engine, stop_engine

    engine = engine_for("llamacpp")
    found = []
    for n in range(runs):
        launch = EngineLaunch(instance_id=n, node_name=node_name, served_model_name=MODEL_ID, model_path=model_path,
                              context_length=CONTEXT_LENGTH, port=free_port(), chat_format="gemma")
        spawned = time.time()
        proc = start_engine(engine, launch, log_path=workdir / "hand-engine.log")
        try:
            healthy = first_healthy_at(engine.health_url(launch))
            if healthy is None:
                raise RuntimeError(f"the engine started by hand did not become healthy (see {workdir})")
            url = f"http://127.0.0.1:{launch.port}/v1/chat/completions"
            first = streamed_request(url, None)
            warm = []
            for other in OTHER_PROMPTS[:warm_requests]:
                streamed_request(url, None, chat_body(other))
                warm.append(streamed_request(url, None))
        finally:
            stop_engine(proc.pid)
        found.append(HandRun(healthy - spawned, first.head - first.sent, first.first_byte - first.sent,
                             statistics.median(a.first_byte - a.sent for a in warm)))
    return found


def _gap(points: dict[str, float | None], start: str, end: str) -> float | None:
    a, b = points[start], points[end]
    return None if a is None or b is None else b - a


def _cell(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def print_report(runs: list[ColdRun], hand: list[HandRun]) -> None:
    hand_healthy_s = statistics.median(h.spawn_to_healthy_s for h in hand)
    hand_warm_s = statistics.median(h.warm_ttfb_s for h in hand)
    hand_first_s = statistics.median(h.first_ttfb_s for h in hand)
    hand_head_s = statistics.median(h.first_head_s for h in hand)
    width = 44

    print(f"\nTimeline of one cold streamed chat request (max_tokens {MAX_TOKENS}), seconds from the client's send:")
    header = f"{'point':<{width}}" + "".join(f"{r.label:>11}" for r in runs)
    print(header)
    print("-" * len(header))
    table = [r.points() for r in runs]
    for name in table[0]:
        print(f"{name:<{width}}" + "".join(f"{_cell(t[name]):>11}" for t in table))

    segments = [
        ("hub: arrival -> placement", "arrival (client sends)", "placement (created_at)"),
        ("queue: placement -> node picks up", "placement (created_at)", "node picks up (started_at)"),
        ("download (download_seconds)", "download start", "download end"),
        ("node: download end -> engine process", "download end", "engine process started (/proc)"),
        ("engine process -> answers health", "engine process started (/proc)", "engine answers health (10 ms poll)"),
        ("node: answers health -> ready_at", "engine answers health (10 ms poll)", "engine healthy (ready_at)"),
        ("ready_at -> 'ready' heard on Redis", "engine healthy (ready_at)", "'ready' heard on Redis"),
        ("ready_at -> answer head", "engine healthy (ready_at)", "answer head at the client"),
        ("answer head -> first byte (engine)", "answer head at the client", "first byte at the client"),
        ("first byte -> last byte", "first byte at the client", "last byte at the client"),
    ]
    print("\nSegments (s):")
    for name, start, end in segments:
        print(f"{name:<{width}}" + "".join(f"{_cell(_gap(t, start, end)):>11}" for t in table))
    for header_name in ("X-Porten-Cold-Start", "X-Porten-Load-Seconds"):
        print(f"{header_name:<{width}}" + "".join(f"{r.answer.headers.get(header_name.lower(), '-'):>11}" for r in runs))

    print(f"\nThe same engine by hand (llama_cpp.server, the node's GGUF, n_ctx {CONTEXT_LENGTH}), asked directly:")
    print(f"{'run':<8}{'spawn->healthy':>15}{'1st head':>10}{'1st TTFB':>10}{'warm TTFB':>11}")
    for n, h in enumerate(hand, 1):
        print(f"{n:<8}{h.spawn_to_healthy_s:>15.3f}{h.first_head_s:>10.3f}{h.first_ttfb_s:>10.3f}{h.warm_ttfb_s:>11.3f}")
    print(f"{'median':<8}{hand_healthy_s:>15.3f}{hand_head_s:>10.3f}{hand_first_s:>10.3f}{hand_warm_s:>11.3f}")

    print("\nPorten's share = TTFB - download - engine spawn->healthy (by hand) - warm direct TTFB (by hand); "
          "beside it, the same against the by-hand engine's first request, and Porten's own steps added up "
          "(placement, queue, node before spawn, health-poll lag, ready_at -> head less the direct head):")
    shares = []
    for r in runs:
        p = r.points()
        share = r.ttfb_s - r.download_s - hand_healthy_s - hand_warm_s
        fresh = r.ttfb_s - r.download_s - hand_healthy_s - hand_first_s
        own = [_gap(p, "arrival (client sends)", "node picks up (started_at)"),
               _gap(p, "download end", "engine process started (/proc)"),
               _gap(p, "engine answers health (10 ms poll)", "engine healthy (ready_at)"),
               _gap(p, "engine healthy (ready_at)", "answer head at the client")]
        steps = None if None in own else sum(own) - hand_head_s
        shares.append((r, share, steps))
        print(f"  {r.label:<9} {r.ttfb_s:6.3f} - {r.download_s:6.3f} - {hand_healthy_s:.3f} - {hand_warm_s:.3f} = "
              f"{share:6.3f} s   fresh engine: {fresh:6.3f} s   own steps: {_cell(steps)} s")
    judged_runs = [s for s in shares if not s[0].instance.downloaded] or shares
    judged = statistics.median(share for _, share, _ in judged_runs)
    print(f"Porten's own share (everything but download, engine start and first token): {judged:.2f} s "
          f"(target <= {TARGET_SHARE_S:.2f} s)"
          + (" [median of the local-weights runs]" if len(judged_runs) < len(shares) else ""))
    own_steps = [steps for _, _, steps in judged_runs if steps is not None]
    if own_steps:
        print(f"Porten's own steps, added up (no engine variance in them): {statistics.median(own_steps):.2f} s "
              "[median]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-runs", type=int, default=3, help="cold requests with the weights already on the node")
    parser.add_argument("--hand-runs", type=int, default=3, help="engine starts by hand")
    args = parser.parse_args()

    from tests.support.hf_endpoint import HFEndpoint
    from tests.support.small_model import GEMMA_GGUF_NAME, gemma_gguf_path, make_hf_repo

    stack = Stack()
    endpoint = worker = watch = None
    try:
        make_hf_repo(stack.workdir / "hf", HF_REPO, {GEMMA_GGUF_NAME: gemma_gguf_path()})
        endpoint = HFEndpoint(stack.workdir / "hf").start()
        offer_model()
        api_key = stack.api_key()
        hub = stack.start_hub()
        worker = NodeWorker(stack, endpoint.url)
        worker.start()
        watch = FleetWatch(MODEL_ID)
        # A hub that has been up a while: its database connection, key cache and engine client exist.
        httpx.post(hub + "/v1/chat/completions", json={**BODY, "model": "no-such-model"},
                   headers={"Authorization": f"Bearer {api_key}"}, timeout=10)

        runs = [cold_request("download", hub, api_key, watch)]
        for n in range(1, args.local_runs + 1):
            unload(runs[-1].instance)
            runs.append(cold_request(f"local {n}", hub, api_key, watch))
        unload(runs[-1].instance)
        model_path = Path(json.loads((stack.workdir / "models" / "complete" / f"{MODEL_ID}.json").read_text())["path"])
        hand = by_hand(model_path, stack.workdir, worker.name + "-hand", args.hand_runs)
        print_report(runs, hand)
        print(f"\n(logs under {stack.workdir})")
    finally:
        from fleet.agent.engines.process import stop_all_engines

        if watch is not None:
            watch.close()
        if worker is not None:
            worker.stop()
            stop_all_engines(worker.name, grace_s=5)
            stop_all_engines(worker.name + "-hand", grace_s=5)
        if endpoint is not None:
            endpoint.stop()
        stack.close()
        for weights in ("models", "hf"):  # the node's copy of the weights and the endpoint's link; the logs stay
            shutil.rmtree(stack.workdir / weights, ignore_errors=True)


if __name__ == "__main__":
    os.chdir(REPO)
    main()

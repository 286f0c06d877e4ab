"""One hot model under 32 streaming clients on a fleet of three nodes: max_replicas=1 against max_replicas=3.

    .venv/bin/python bench/fleet_scale.py [--clients 32] [--ramp-s 15] [--window-s 20]

Three real node agents (`manage.py node_worker`, one process each, as hosts 127.0.0.2-4) start
their engines through the llamacpp engine's llama-server command line, pointed at
bench/stub_llama_server.py: 4 parallel slots (further requests wait inside the engine, as in
llama.cpp), 16 tokens 8 ms apart. The weights (a few bytes, never read) come from a local Hugging
Face endpoint. One hub (uvicorn), its Celery worker and beat run on a private Redis and SQLite
(harness.Stack), with the autoscaler every second and a replica added after 2 s over target.

For each max_replicas, a fresh catalog model (target_inflight 4) is warmed with one request, then
the clients stream back to back: a ramp (not counted; replicas are added in it), then the
measured window. Printed: requests/s in the window, p50 and p99 latency, the extra loads started
(instances created for the model, less the first), when each replica was created and ready, and
how many requests each replica had in flight on average in the window.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx

from harness import REPO, LoadClient, Sample, Stack, load_window, pct

# name -> the address the hub dials and the engines listen on.
NODES = {"bench-scale-a": "127.0.0.2", "bench-scale-b": "127.0.0.3", "bench-scale-c": "127.0.0.4"}
NODE_MEMORY_MB = 4000
MODEL_VRAM_MB = 1000  # three models' worth per node: any node can take a replica
HF_REPO = "bench/stub-gguf"
SLOTS, TOKENS, TOKEN_DELAY_MS = 4, 16, 8.0
TARGET_INFLIGHT = 4
RATIO_TARGET = 2.5
EXTRA_LOADS_WANTED = {1: 0, 3: 2}
FLEET_ENV = {
    "PORTEN_HEARTBEAT_S": "2",
    "PORTEN_AUTOSCALE_S": "1",
    "PORTEN_SCALE_OUT_AFTER_S": "2",
    "PORTEN_IDLE_SWEEP_S": "3600",  # nothing unloads for idleness during the run
    "PORTEN_SUPERVISE_S": "0.5",
    "PORTEN_PROGRESS_INTERVAL_S": "0.2",
    "PORTEN_ENGINE_LOAD_TIMEOUT_S": "60",
}
STUB_ENV = {"PORTEN_STUB_SLOTS": str(SLOTS), "PORTEN_STUB_TOKENS": str(TOKENS),
            "PORTEN_STUB_TOKEN_DELAY_MS": str(TOKEN_DELAY_MS)}
INFLIGHT_POLL_S = 0.5


class Fleet:
    """The hub's Celery worker and beat, and the three node agents, started with the stack's environment."""

    def __init__(self, stack: Stack, hf_url: str) -> None:
        self.stack, self.hf_url = stack, hf_url
        self.nodes: dict[str, subprocess.Popen] = {}
        self.server_bin = self._llama_server_wrapper()

    def _llama_server_wrapper(self) -> Path:
        """An executable `llama-server` that runs the stub with this benchmark's Python."""
        path = self.stack.workdir / "llama-server"
        script = REPO / "bench" / "stub_llama_server.py"
        path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(script))} \"$@\"\n")
        path.chmod(0o755)
        return path

    def spawn(self, argv: list[str], log_name: str, **env: str) -> subprocess.Popen:
        log = open(self.stack.workdir / log_name, "ab")
        proc = subprocess.Popen(argv, cwd=REPO, env={**self.stack.env, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.stack.procs.append(proc)  # stopped by stack.close()
        return proc

    def start_hub_services(self) -> None:
        celery = [sys.executable, "-m", "celery", "-A", "porten"]
        self.spawn([*celery, "worker", "-Q", "hub", "-n", "hub@%h", "--pool", "threads", "--concurrency", "2",
                    "--without-gossip", "--without-mingle"], "hub-worker.log")
        self.spawn([*celery, "beat", "-s", str(self.stack.workdir / "beat-schedule"), "--loglevel", "INFO"],
                   "beat.log")

    def start_nodes(self, timeout_s: float = 90) -> None:
        from fleet.models import Node

        for name, address in NODES.items():
            home = self.stack.workdir / name
            env = {**STUB_ENV, "PORTEN_NODE_NAME": name, "PORTEN_NODE_ADDRESS": address,
                   "PORTEN_NODE_MEMORY_MB": str(NODE_MEMORY_MB), "PORTEN_MODEL_DIR": str(home / "models"),
                   "PORTEN_ENGINE_LOG_DIR": str(home / "engine-logs"), "PORTEN_LLAMA_SERVER_BIN": str(self.server_bin), "PORTEN_LLAMA_SERVER_PARALLEL": str(SLOTS),
                   "HF_ENDPOINT": self.hf_url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "HF_HUB_ETAG_TIMEOUT": "5", "PYTHONUNBUFFERED": "1"}
            log_name = f"worker-{name}.log"
            argv = [sys.executable, "manage.py", "node_worker", "--concurrency", "4", "--loglevel", "INFO"]
            log = open(self.stack.workdir / log_name, "ab")
            self.nodes[name] = subprocess.Popen(argv, cwd=REPO, env={**self.stack.env, **env}, stdout=log,
                                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        waiting = set(NODES)
        while waiting:
            for name in sorted(waiting):
                log = self.stack.workdir / f"worker-{name}.log"
                if self.nodes[name].poll() is not None:
                    raise RuntimeError(f"node worker {name} exited:\n{log.read_text()[-3000:]}")
                if "ready." in log.read_text() and Node.objects.filter(name=name, last_heartbeat_at__isnull=False).exists():
                    waiting.discard(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"node workers {sorted(waiting)} not ready in {timeout_s} s")
            time.sleep(0.2)

    def stop_hub_side(self) -> None:
        """The hub, its worker and beat, before the stack stops Redis under them."""
        hub_side = [proc for proc in self.stack.procs[1:] if proc.poll() is None]  # [0] is Redis
        for proc in hub_side:
            proc.terminate()
        for proc in hub_side:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def stop_nodes(self) -> None:
        """Each agent, then every engine it started (an agent's shutdown leaves its engines running)."""
        from fleet.agent.engines.process import stop_all_engines

        for proc in self.nodes.values():
            if proc.poll() is None:
                proc.terminate()
        for name, proc in self.nodes.items():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            stop_all_engines(name, grace_s=5)


def offer(model_id: str, max_replicas: int):
    from catalog.models import CatalogModel

    return CatalogModel.objects.create(
        model_id=model_id, display_name=f"Hot stub model, max_replicas {max_replicas}", hf_repo=HF_REPO,
        hf_revision="main", hf_files=["*.gguf"], weight_format="gguf", engine="llamacpp", context_length=512,
        vram_mb=MODEL_VRAM_MB, disk_mb=1, max_replicas=max_replicas, target_inflight=TARGET_INFLIGHT)


def warm(hub: str, api_key: str, model_id: str, timeout_s: float = 120) -> float:
    """One request until it is answered (the hub's catalog cache may not know the model for a
    couple of seconds); returns the seconds it took."""
    started = time.monotonic()
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": TOKENS}
    last = None
    while time.monotonic() - started < timeout_s:
        last = httpx.post(hub + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"},
                          timeout=timeout_s)
        if last.status_code == 200:
            return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"{model_id} not warmed in {timeout_s} s: {last.status_code} {last.text[:300]}")


class InflightWatch(threading.Thread):
    """Samples, every INFLIGHT_POLL_S, the requests in flight on each live instance of the model
    (fleet.live.inflight_count, what the autoscaler reads)."""

    def __init__(self, model_id: str) -> None:
        super().__init__(daemon=True)
        self.model_id = model_id
        self.samples: list[tuple[float, int, int]] = []  # (time.time(), instance pk, in flight)
        self.done = threading.Event()

    def run(self) -> None:
        from django.db import connection

        from fleet.live import inflight_count
        from fleet.models import ACTIVE_PHASES, Instance

        try:
            while not self.done.wait(INFLIGHT_POLL_S):
                for pk in Instance.objects.filter(model__model_id=self.model_id, phase__in=ACTIVE_PHASES
                                                  ).values_list("pk", flat=True):
                    self.samples.append((time.time(), pk, inflight_count(pk)))
        finally:
            connection.close()

    def mean_inflight(self, since: float, until: float) -> dict[int, float]:
        per: dict[int, list[int]] = defaultdict(list)
        for at, pk, count in self.samples:
            if since <= at <= until:
                per[pk].append(count)
        return {pk: sum(counts) / len(counts) for pk, counts in per.items()}


class Case:
    def __init__(self, max_replicas: int, model_id: str) -> None:
        self.max_replicas, self.model_id = max_replicas, model_id
        self.ramp, self.window = Sample(), Sample()
        self.warm_s = 0.0
        self.warm_started = 0.0  # time.time()
        self.load_started = self.window_from = self.window_until = 0.0  # time.time()
        self.instances: list = []
        self.inflight: dict[int, float] = {}

    @property
    def rps(self) -> float:
        return len(self.window.latencies_s) / (self.window_until - self.window_from)

    @property
    def extra_loads(self) -> int:
        return len(self.instances) - 1


def run_case(hub: str, api_key: str, max_replicas: int, args) -> Case:
    from fleet.models import Instance

    case = Case(max_replicas, f"bench-hot-{max_replicas}x-{uuid.uuid4().hex[:6]}")
    offer(case.model_id, max_replicas)
    case.warm_started = time.time()
    case.warm_s = warm(hub, api_key, case.model_id)
    watch = InflightWatch(case.model_id)
    watch.start()
    case.load_started = time.time()
    case.window_from = case.load_started + args.ramp_s
    case.window_until = case.window_from + args.window_s
    try:
        case.ramp, case.window = asyncio.run(clients(hub, api_key, case.model_id, args))
    finally:
        watch.done.set()
        watch.join()
    case.instances = list(Instance.objects.filter(model__model_id=case.model_id).select_related("node")
                          .order_by("created_at"))
    case.inflight = watch.mean_inflight(case.window_from, case.window_from + args.window_s)
    return case


async def clients(hub: str, api_key: str, model_id: str, args) -> tuple[Sample, Sample]:
    client = LoadClient()
    try:
        # Spread over about one answer's time, so clients with equal answer times do not arrive in step.
        return await load_window(hub, model=model_id, concurrency=args.clients, ramp_s=args.ramp_s,
                                 window_s=args.window_s, stream=True, api_key=api_key, max_tokens=TOKENS,
                                 spread_s=TOKENS * TOKEN_DELAY_MS / 1000, client=client, timeout_s=60)
    finally:
        await client.aclose()


def _at(moment, since: float) -> str:
    return "-" if moment is None else f"{moment.timestamp() - since:+.1f}"


def report(cases: list[Case], args) -> bool:
    engine_rps = SLOTS / (TOKENS * TOKEN_DELAY_MS / 1000)
    print(f"\nFleet: {len(NODES)} nodes, stub llama-server engines ({SLOTS} slots, {TOKENS} tokens "
          f"{TOKEN_DELAY_MS:g} ms apart: at most {engine_rps:.1f} streams/s each); {args.clients} streaming "
          f"clients; ramp {args.ramp_s:g} s (not counted), window {args.window_s:g} s; target_inflight "
          f"{TARGET_INFLIGHT}; autoscale every {FLEET_ENV['PORTEN_AUTOSCALE_S']} s, scale out after "
          f"{FLEET_ENV['PORTEN_SCALE_OUT_AFTER_S']} s over target")
    header = (f"{'max_replicas':<13}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'ttft p50':>10}{'requests':>10}"
              f"{'errors':>8}{'ramp err':>9}{'instances':>10}{'extra loads':>12}")
    print(header)
    print("-" * len(header))
    for case in cases:
        print(f"{case.max_replicas:<13}{case.rps:>8.1f}{pct(case.window.latencies_s, 50) * 1000:>9.1f}"
              f"{pct(case.window.latencies_s, 99) * 1000:>9.1f}{pct(case.window.ttft_s, 50) * 1000:>10.1f}"
              f"{len(case.window.latencies_s):>10}{case.window.errors:>8}{case.ramp.errors:>9}"
              f"{len(case.instances):>10}{case.extra_loads:>12}")
    for case in cases:
        failures = dict(case.ramp.failures + case.window.failures)
        first = case.instances[0] if case.instances else None
        ready_s = first.ready_at.timestamp() - case.warm_started if first and first.ready_at else float("nan")
        print(f"\nmax_replicas={case.max_replicas} ({case.model_id}; warm-up request {case.warm_s:.2f} s, "
              f"its engine ready {ready_s:.2f} s after it was sent"
              + (f"; failures {failures}" if failures else "") + "); seconds from the clients' start:")
        print(f"  {'replica':<8}{'node':<15}{'created':>8}{'ready':>8}  {'phase':<10}{'in flight, window mean':>23}")
        for instance in case.instances:
            mean = case.inflight.get(instance.pk)
            print(f"  {instance.replica:<8}{instance.node.name:<15}{_at(instance.created_at, case.load_started):>8}"
                  f"{_at(instance.ready_at, case.load_started):>8}  {instance.phase:<10}"
                  f"{'-' if mean is None else f'{mean:.1f}':>23}")
    ratio = cases[1].rps / cases[0].rps if cases[0].rps else float("nan")
    ratio_met = ratio >= RATIO_TARGET
    loads_met = {case.max_replicas: case.extra_loads == EXTRA_LOADS_WANTED[case.max_replicas] for case in cases}
    clean = all(case.window.errors == 0 for case in cases)
    print(f"\nThroughput ratio (max_replicas=3 / =1): {ratio:.2f}x (target >= {RATIO_TARGET}x): "
          f"{'met' if ratio_met else 'NOT met'}")
    for case in cases:
        print(f"Extra loads for max_replicas={case.max_replicas}: {case.extra_loads} "
              f"(exactly {EXTRA_LOADS_WANTED[case.max_replicas]} wanted): "
              f"{'met' if loads_met[case.max_replicas] else 'NOT met'}")
    print(f"Errors in the measured windows: {sum(c.window.errors for c in cases)}"
          f"{'' if clean else ' (NOT clean)'}")
    return ratio_met and all(loads_met.values()) and clean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--ramp-s", type=float, default=15.0, help="load before the window, not counted")
    parser.add_argument("--window-s", type=float, default=20.0, help="the measured window")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs are kept anyway)")
    args = parser.parse_args()

    from tests.support.hf_endpoint import HFEndpoint
    from tests.support.small_model import make_hf_repo

    stack = Stack()
    stack.env.update(FLEET_ENV, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    endpoint = fleet = None
    try:
        make_hf_repo(stack.workdir / "hf", HF_REPO, {"stub-q4_k_m.gguf": b"GGUF" + bytes(4092)})
        endpoint = HFEndpoint(stack.workdir / "hf").start()
        api_key = stack.api_key()
        hub = stack.start_hub()
        fleet = Fleet(stack, endpoint.url)
        fleet.start_hub_services()
        fleet.start_nodes()
        cases = [run_case(hub, api_key, max_replicas, args) for max_replicas in (1, 3)]
        met = report(cases, args)
        print(f"All targets met: {'yes' if met else 'NO'}\n(logs under {stack.workdir})")
        return 0 if met else 1
    finally:
        if fleet is not None:
            fleet.stop_nodes()
            fleet.stop_hub_side()
        if endpoint is not None:
            endpoint.stop()
        stack.close()
        if not args.keep:
            for name in [*NODES, "hf"]:  # the nodes' model stores and the endpoint's repo; logs stay
                shutil.rmtree(stack.workdir / name / "models" if name in NODES else stack.workdir / name,
                              ignore_errors=True)


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())

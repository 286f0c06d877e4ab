"""Shared set-up for benchmarks: a private Redis, database and hub (under a chosen ASGI server), and
load generators."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """An HTTP/1.1 answer's status and headers."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    return status, headers


# The ASGI servers a hub can run under: a command line for (host, port, processes).
SERVERS = {
    "uvicorn": lambda host, port, processes: [
        sys.executable, "-m", "uvicorn", "porten.asgi:application", "--host", host, "--port", str(port),
        "--workers", str(processes), "--loop", "uvloop", "--http", "httptools", "--lifespan", "on"],
    "granian": lambda host, port, processes: [
        sys.executable, "-m", "granian", "--interface", "asgi", "--host", host, "--port", str(port),
        "--workers", str(processes), "--loop", "uvloop", "--no-ws", "porten.asgi:application"],
    # daphne has no processes of its own (it documents running several behind a process manager).
    "daphne": lambda host, port, processes: [
        sys.executable, "-m", "daphne", "-b", host, "-p", str(port), "porten.asgi:application"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _threads(pid: int) -> dict[int, list[int]]:
    """Each thread of process `pid` and of its living child processes, as {thread id: its child pids}."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = [int(child) for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (ProcessLookupError, FileNotFoundError):
            continue  # the thread ended meanwhile
    return found


def set_cpus(pid: int, cpus: set[int]) -> None:
    """Run every thread of process `pid`, and of its child processes, on `cpus` only."""
    for tid, children in _threads(pid).items():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            continue
        for child in children:
            set_cpus(child, cpus)


def layouts(proxies: list[int]) -> list[tuple[str, dict[int, set[int]]]]:
    """The CPU layouts a proxy is measured in, as (name, {pid: cpus}):
    - shared: the load generator, the engine and the proxy compete for every core, as on a laptop;
    - proxy alone: the proxy (`proxies`, each in turn) gets the last core to itself, the load generator
      and the engine share the others, as in production, where clients are elsewhere and the hub has
      its own cores. This bench process is the load generator, and the engine runs as its child."""
    everything = set(range(os.cpu_count() or 1))
    found = [("shared cores", {os.getpid(): everything})]
    if len(everything) >= 2:
        proxy_cpu = {max(everything)}
        found.append(("proxy on a core of its own", {os.getpid(): everything - proxy_cpu,
                                                      **{pid: proxy_cpu for pid in proxies}}))
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) that process `pid` and its living child processes have used."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [child for kids in _threads(pid).values() for child in kids]
    except (ProcessLookupError, FileNotFoundError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(map(cpu_seconds, children))


def apply_layout(layout: dict[int, set[int]]) -> None:
    for pid, cpus in layout.items():  # this process (and its children) first, then the proxies
        set_cpus(pid, cpus)


class Stack:
    """Redis + a migrated SQLite database + (on demand) a hub, all private to one bench run."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="porten-bench-"))
        self.procs: list[subprocess.Popen] = []
        redis_port = free_port()
        self.procs.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", PORTEN_VAR_DIR=str(self.workdir),
                        DJANGO_SETTINGS_MODULE="porten.settings", PORTEN_LOG_LEVEL="WARNING")
        os.environ.update(self.env)
        time.sleep(0.3)
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)

    def start_hub(self, server: str = "uvicorn", processes: int = 1, command: list[str] | None = None,
                  **env: str) -> str:
        """A hub under `server` (a key of SERVERS) with `processes` processes, or started as `command`
        (which gets --host and --port appended); `env` is added to its environment."""
        port = free_port()
        log = open(self.workdir / "hub.log", "ab")
        argv = [*command, "--host", "127.0.0.1", "--port", str(port)] if command else \
            SERVERS[server]("127.0.0.1", port, processes)
        self.hub = subprocess.Popen(argv, cwd=REPO, env={**self.env, **env}, stdout=log, stderr=log)
        self.procs.append(self.hub)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz")
        return url

    def start_stub(self, model_id: str, *, tokens: int = 16, token_delay_ms: float = 2) -> int:
        """bench/stub_engine.py on a free port, serving `model_id` as a ready instance: its port."""
        port = free_port()
        self.start([sys.executable, str(REPO / "bench/stub_engine.py"), "--port", str(port), "--tokens", str(tokens),
                    "--token-delay-ms", str(token_delay_ms)], f"http://127.0.0.1:{port}/health")
        self.serving(model_id, port)
        return port

    def start(self, argv: list[str], health_url: str, **env: str) -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=REPO, env={**self.env, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_http(health_url, timeout_s=120)
        return proc

    def serving(self, model_id: str, port: int, *, vram_mb: int = 1024, slots: int = 10_000) -> None:
        """A catalog model with a ready instance on `port`, as if a node had loaded it there."""
        from django.utils import timezone

        from catalog.models import CatalogModel
        from fleet.models import Instance, Node

        node, _ = Node.objects.get_or_create(name="bench-node", defaults={
            "gpus": [{"index": 0, "name": "cpu", "total_mb": 1_000_000, "free_mb": 1_000_000}]})
        Node.objects.filter(pk=node.pk).update(last_heartbeat_at=timezone.now())
        self._keep_heartbeat(node.pk)
        model, _ = CatalogModel.objects.get_or_create(model_id=model_id, defaults=dict(
            display_name=model_id, hf_repo=f"bench/{model_id}", weight_format="gguf", engine="llamacpp",
            context_length=4096, vram_mb=vram_mb, disk_mb=100))
        # The stub serves any number of requests at once (unless started with --slots).
        Instance.objects.create(model=model, node=node, phase="ready", port=port, vram_mb=vram_mb,
                                ready_at=timezone.now(), slots=slots)

    def _keep_heartbeat(self, node_pk: int) -> None:
        """No node agent runs in a benchmark: beat for it, or the hub takes the node for dead."""
        if getattr(self, "_heartbeat", None):
            return
        import threading

        from django.db import close_old_connections
        from django.utils import timezone

        from fleet.models import Node

        def beat() -> None:
            while True:
                time.sleep(5)
                Node.objects.filter(pk=node_pk).update(last_heartbeat_at=timezone.now())
                close_old_connections()

        self._heartbeat = threading.Thread(target=beat, daemon=True)
        self._heartbeat.start()

    def api_key(self, **scope) -> str:
        from porten.keys import api_key_create

        return api_key_create(name="bench", **scope)[1]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclass
class Sample:
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    errors: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)  # what each error was

    def failed(self, why: str) -> None:
        self.errors += 1
        self.failures[why] += 1


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class _ChunkedEnd:
    """Finds where a chunked body ends, as its bytes arrive, without decoding it: only the chunk size
    lines are read, the data is stepped over."""

    __slots__ = ("skip", "tail", "finished")

    def __init__(self) -> None:
        self.skip, self.tail, self.finished = 0, b"", False

    def feed(self, data: bytes) -> None:
        if self.tail:  # a size line split across two reads
            data, self.tail = self.tail + data, b""
        pos, size = self.skip, len(data)
        while pos < size:
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                self.tail = data[pos:]
                pos = size
                break
            chunk = int(data[pos:line_end].split(b";", 1)[0], 16)
            if chunk == 0:  # the last chunk, then the empty line (no trailers: engines and proxies send none)
                if size - line_end >= 4:
                    self.finished = True
                    return
                self.tail = data[pos:]
                pos = size
                break
            pos = line_end + 2 + chunk + 2
        self.skip = pos - size


class _Exchange(asyncio.Protocol):
    """One load-generator connection: a request written whole, its answer read as it arrives
    (framed by Content-Length, chunked transfer-coding or the connection's end), with the time its
    first body bytes came."""

    def __init__(self) -> None:
        self.transport, self.done, self.lost = None, None, False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, payload: bytes) -> asyncio.Future:
        """The answer's (status, first body bytes' perf_counter time or None), once it is all here."""
        self.head, self.status, self.first, self.left, self.chunks = b"", 0, None, None, None
        self.keep = True
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.done

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.done.done():
            return
        if self.status == 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status, headers = parse_head(self.head[:end + 4])
            headers = {name.lower(): value.lower() for name, value in headers}
            if headers.get(b"transfer-encoding") == b"chunked":
                self.chunks = _ChunkedEnd()
            elif b"content-length" in headers:
                self.left = int(headers[b"content-length"])
            self.keep = headers.get(b"connection") != b"close" and (self.chunks is not None or self.left is not None)
            data = self.head[end + 4:]
            if not data and self.left != 0:
                return
        if data and self.first is None:
            self.first = time.perf_counter()
        if self.chunks is not None:
            self.chunks.feed(data)
            if self.chunks.finished:
                self.done.set_result((self.status, self.first))
        elif self.left is not None:
            self.left -= len(data)
            if self.left <= 0:
                self.done.set_result((self.status, self.first))

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.done is not None and not self.done.done():
            if self.status and self.chunks is None and self.left is None:  # framed by the connection's end
                self.done.set_result((self.status, self.first))
            else:
                self.done.set_exception(ConnectionError("the connection closed before the answer's end"))


class LoadClient:
    """The load generator's connections, kept from one load call to the next on the same event loop
    (see load), at most one per client in use at once."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[_Exchange]] = {}

    async def exchange(self, host: str, port: int, payload: bytes, timeout_s: float) -> tuple[int, float | None]:
        idle = self.idle.setdefault((host, port), [])
        conn = idle.pop() if idle else None
        if conn is None or conn.lost:
            _, conn = await asyncio.get_running_loop().create_connection(_Exchange, host, port)
        try:
            async with asyncio.timeout(timeout_s):
                status, first = await conn.send(payload)
        except BaseException:
            conn.transport.close()
            raise
        if conn.keep and not conn.lost:
            idle.append(conn)
        else:
            conn.transport.close()
        return status, first

    async def aclose(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.transport.close()
        self.idle.clear()


def _request(url: str, path: str, body: dict, api_key: str | None) -> tuple[str, int, bytes]:
    """(host, port, the request's bytes) for a POST of `body` as JSON to `url` + `path`."""
    target = httpx.URL(url)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nContent-Type: application/json\r\n" \
           f"Content-Length: {len(data)}\r\n" + (f"Authorization: Bearer {api_key}\r\n" if api_key else "") + "\r\n"
    return target.host, target.port or 80, head.encode() + data


async def _timed_call(client: LoadClient, host: str, port: int, payload: bytes, timeout_s: float, stream: bool,
                      sample: Sample, started: float) -> None:
    """One request over `client`, recorded in `sample`: its latency (and time to first byte when
    streamed), or what its failure was."""
    try:
        status, first = await client.exchange(host, port, payload, timeout_s)
    except (OSError, TimeoutError, ValueError, httpx.HTTPError) as exc:
        sample.failed(type(exc).__name__)
        return
    ended = time.perf_counter()
    if status != 200:
        sample.failed(f"HTTP {status}")
        return
    if stream:
        sample.ttft_s.append((first or ended) - started)
    sample.latencies_s.append(ended - started)


@contextlib.asynccontextmanager
async def _client_or_own(client: LoadClient | None):
    """`client`, or connections of the call's own, closed when it ends."""
    if client is not None:
        yield client
        return
    own = LoadClient()
    try:
        yield own
    finally:
        await own.aclose()


async def load(url: str, *, model: str, concurrency: int, requests: int, stream: bool, api_key: str | None,
               max_tokens: int = 16, path: str = "/v1/chat/completions", spread_s: float = 0.0,
               client: LoadClient | None = None, timeout_s: float = 120) -> Sample:
    """`concurrency` clients, each sending requests back to back until `requests` are done, over
    `client` (a LoadClient) when given, else over connections of their own.

    Each client starts at a random moment within `spread_s` (pass about one answer's time), as
    independent clients do: started in the same instant, clients with equal answer times stay in
    step and arrive in bursts. The clients speak plain HTTP/1.1 keep-alive, each connection a bare
    asyncio protocol that writes a request made once and reads its answer as it comes, so that the
    load generator's own CPU, shared with the engine and the proxy on a small machine, stays low
    (docs/performance.md, "How the bench is built")."""
    sample = Sample()
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
            "stream": stream}
    host, port, payload = _request(url, path, body, api_key)
    remaining = [requests]

    async def worker(client: LoadClient):
        await asyncio.sleep(random.uniform(0, spread_s) if concurrency > 1 else 0)
        while remaining[0] > 0:
            remaining[0] -= 1
            await _timed_call(client, host, port, payload, timeout_s, stream, sample, time.perf_counter())

    async with _client_or_own(client) as client:
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
    return sample


async def load_window(url: str, *, model: str, concurrency: int, ramp_s: float, window_s: float, stream: bool,
                      api_key: str | None, max_tokens: int = 16, path: str = "/v1/chat/completions",
                      spread_s: float = 0.0, client: LoadClient | None = None,
                      timeout_s: float = 120) -> tuple[Sample, Sample]:
    """`concurrency` clients, as in load, each sending requests back to back for `ramp_s` +
    `window_s` seconds: (the requests started in the ramp, those started in the window). A client
    finishes the request it has in flight when the time is up, so a window's count over `window_s`
    is its throughput (the requests cut at its start make up for those finished after its end)."""
    ramp, window = Sample(), Sample()
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
            "stream": stream}
    host, port, payload = _request(url, path, body, api_key)
    begun = time.perf_counter()
    window_from, ends = begun + ramp_s, begun + ramp_s + window_s

    async def worker(client: LoadClient):
        await asyncio.sleep(random.uniform(0, spread_s) if concurrency > 1 else 0)
        while (started := time.perf_counter()) < ends:
            await _timed_call(client, host, port, payload, timeout_s, stream,
                              ramp if started < window_from else window, started)

    async with _client_or_own(client) as client:
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
    return ramp, window


async def load_open(url: str, *, model: str, rate: float, seconds: float, stream: bool, api_key: str | None,
                    max_tokens: int = 16, path: str = "/v1/chat/completions", client: LoadClient | None = None,
                    timeout_s: float = 120) -> Sample:
    """Requests arriving at random (a Poisson process of `rate` a second) for `seconds`, each sent
    when it arrives whatever is in flight: open-loop load. Unlike load's clients, which send their
    next request when the last one ends and so, with equal answer times, fall into step with each
    other, these arrivals never line up (docs/performance.md, gateway_overhead, "after stop 25")."""
    sample = Sample()
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
            "stream": stream}
    host, port, payload = _request(url, path, body, api_key)
    async with _client_or_own(client) as client:
        calls, begun = [], time.perf_counter()
        arrival = begun
        while arrival - begun < seconds:
            arrival += random.expovariate(rate)
            if (wait_s := arrival - time.perf_counter()) > 0:
                await asyncio.sleep(wait_s)
            calls.append(asyncio.ensure_future(
                _timed_call(client, host, port, payload, timeout_s, stream, sample, time.perf_counter())))
        await asyncio.gather(*calls)
    return sample


def summary(sample: Sample) -> dict:
    return {
        "n": len(sample.latencies_s), "errors": sample.errors, "failures": dict(sample.failures),
        "p50_ms": pct(sample.latencies_s, 50) * 1000, "p99_ms": pct(sample.latencies_s, 99) * 1000,
        "ttft_p50_ms": pct(sample.ttft_s, 50) * 1000 if sample.ttft_s else None,
        "mean_ms": statistics.fmean(sample.latencies_s) * 1000 if sample.latencies_s else float("nan"),
    }

"""A soak: 1,000 streams open through one hub at all times, none lost or cut, the hub's memory flat.

    python bench/soak.py [--duration-s 600] [--streams 1000] [--hub-processes 1] [--engines 2]
                         [--tokens 200] [--token-delay-ms 50] [--warmup-s 30] [--server uvicorn] [--direct]

Each of `--streams` clients sends streamed chat completions through the hub, one after the
other over its own keep-alive connection, to stub engines (bench/stub_engine.py with
--full-stream: `--tokens` tokens `--token-delay-ms` apart, so a stream lasts several seconds),
so that that many streams are open at every moment. The clients start at random moments within
one stream's length (harness.load explains why), the first `--warmup-s` seconds are not counted,
then `--duration-s` seconds are; when the time is up each client finishes the stream it has open.

Every stream is checked whole: a 200, a role chunk, `--tokens` content chunks, a finish_reason
chunk, `data: [DONE]`, and no error event. A stream is lost when no answer came (no connection,
or it closed or timed out before the answer's head), cut when its answer began but did not come
whole, errored when the hub answered with an error status or an error event. The hub's resident
memory (all its processes summed, psutil) is sampled every `--sample-s` seconds.

Prints the streams completed, lost / cut / errored (must all be 0), requests/s, stream length and
time to first bytes, the hub's CPU and its wait for a core, the hub's RSS at the window's start
(after the warm-up), its peak and end, the slope over the window's second half, and
"memory flat: yes/no". Flat: the end is within max(20 MiB, 10 % of the start) of the start, and no
steady growth, i.e. not (a second-half slope above 1 MiB/min that adds more than 5 MiB over that
half; the second clause keeps a short run's noise from reading as growth). Exits 1 when a stream
was lost, cut or errored, or the memory was not flat.

The clients are lean (harness._Exchange, a bare asyncio protocol per connection, on uvloop), as
they share the cores with the hub and the engines on a small machine; each engine's instance has
the stub's unlimited slots (harness.Stack.serving), so the hub's per-engine gate queues nothing and
the soak measures the hub, not a queue. `--direct` is the control: the same streams straight to the
engines, no hub (the memory and CPU figures are then the engines').
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import psutil
import uvloop

from harness import REPO, SERVERS, Stack, _Exchange, _request, cpu_seconds, free_port, pct

# Flat memory (see the docstring): the end's allowance over the start, and what counts as steady growth.
FLAT_MIB, FLAT_SHARE = 20.0, 0.10
GROWTH_MIB_PER_MIN, GROWTH_MIB = 1.0, 5.0
MIB = 2 ** 20


class _KeptExchange(_Exchange):
    """harness._Exchange that also keeps the answer's bytes, to be checked once it is all here."""

    def send(self, payload: bytes) -> asyncio.Future:
        self.raw: list[bytes] = []
        return super().send(payload)

    def data_received(self, data: bytes) -> None:
        if self.done is not None and not self.done.done():
            self.raw.append(data)
        super().data_received(data)

    def body(self) -> bytes:
        """The answer's body, its chunked transfer-coding undone."""
        raw = b"".join(self.raw)
        body = raw[raw.find(b"\r\n\r\n") + 4:]
        if self.chunks is None:
            return body
        parts, pos = [], 0
        while True:
            line_end = body.index(b"\r\n", pos)
            size = int(body[pos:line_end].split(b";", 1)[0], 16)
            if size == 0:
                return b"".join(parts)
            parts.append(body[line_end + 2:line_end + 2 + size])
            pos = line_end + 2 + size + 2


def stream_fault(body: bytes, tokens: int) -> tuple[str, str] | None:
    """None for a whole chat completion stream of `tokens` content chunks, else ("cut" or
    "errored", why). Only the first and last events are decoded: the content events are counted,
    which keeps the check cheap enough for the load generator's share of the cores."""
    if b'"error"' in body:
        return "errored", "an error event"
    events = body.split(b"\n\n")
    if events[-1] != b"":
        return "cut", "ends inside an event"
    events = [event for event in events[:-1] if not event.startswith(b":")]  # SSE comments: keep-alives
    if not events or events[-1] != b"data: [DONE]":
        return "cut", "no data: [DONE]"
    if len(events) < 3:
        return "cut", "no role or finish_reason chunk"
    try:
        first, last = json.loads(events[0][6:]), json.loads(events[-2][6:])
        role = first["choices"][0]["delta"].get("role")
        finish = last["choices"][0].get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError):
        return "cut", "a malformed first or last event"
    if role != "assistant":
        return "cut", "no role chunk"
    if not finish:
        return "cut", "no finish_reason"
    content = sum(1 for event in events[1:-2] if event.startswith(b"data: {") and b'"content"' in event)
    if content != tokens or len(events) != tokens + 3:
        return "cut", f"{content} content chunks of {tokens}"
    return None


class Tally:
    """What became of the streams: outcomes with their reasons, those started in the window, and
    how many are open now."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter = collections.Counter()
        self.reasons: collections.Counter = collections.Counter()
        self.in_window = 0
        self.open = 0
        self.length_s: list[float] = []  # whole streams started in the window: request to last byte
        self.ttft_s: list[float] = []  # and to the first body bytes

    def record(self, outcome: str, why: str = "") -> None:
        self.outcomes[outcome] += 1
        if why:
            self.reasons[f"{outcome}: {why}"] += 1


def resident_bytes(pids: list[int]) -> tuple[int, int]:
    """(resident bytes of processes `pids` and every process under them, how many processes)."""
    procs = [psutil.Process(pid) for pid in pids]
    procs += [child for proc in procs for child in proc.children(recursive=True)]
    total = counted = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
            counted += 1
        except psutil.NoSuchProcess:
            continue
    return total, counted


def cpu_wait_s(pids: list[int]) -> float:
    """Seconds the threads of processes `pids` and of those under them spent ready to run but
    waiting for a core (the kernel's run-queue delay): on a machine others use too, what tells a
    slow hub from a starved one."""
    total = 0.0
    for pid in pids:
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            try:
                tasks = os.listdir(f"/proc/{proc.pid}/task")
            except FileNotFoundError:
                continue
            for tid in tasks:
                try:
                    total += int(Path(f"/proc/{proc.pid}/task/{tid}/schedstat").read_text().split()[1]) / 1e9
                except (FileNotFoundError, ProcessLookupError, IndexError):
                    continue  # the thread or process ended meanwhile
    return total


async def soak(targets: list[tuple[str, str]], key: str | None, *, streams: int, tokens: int, stream_s: float,
               warmup_s: float, duration_s: float, sample_s: float, watched: list[int]) -> dict:
    """Run the soak against `targets`, (base URL, model) pairs taken in turn by the clients; returns
    the tally, the samples of the `watched` processes' memory [(seconds since the window began,
    bytes, streams open)], how many processes those were, and the cores they used and waited for
    over the samples."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    requests = [_request(url, "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": tokens, "stream": True},
        key) for url, model in targets]
    timeout_s = 60 + 4 * stream_s  # far past a stream's length even on a busy machine: a stall, not slowness
    begun = time.perf_counter()
    window_from, ends = begun + warmup_s, begun + warmup_s + duration_s

    async def client(index: int) -> None:
        host, port, payload = requests[index % len(requests)]
        await asyncio.sleep(random.uniform(0, stream_s))
        conn: _KeptExchange | None = None
        while (started := time.perf_counter()) < ends:
            if conn is None or conn.lost or not conn.keep:
                try:
                    _, conn = await loop.create_connection(_KeptExchange, host, port)
                except OSError as exc:
                    tally.record("lost", f"connect: {type(exc).__name__}")
                    conn = None
                    await asyncio.sleep(0.5)  # a hub that is gone must not make this a busy loop
                    continue
            tally.open += 1
            if started >= window_from:
                tally.in_window += 1
            try:
                async with asyncio.timeout(timeout_s):
                    status, first = await conn.send(payload)
            except (OSError, TimeoutError, ValueError) as exc:
                conn.transport.close()
                tally.record("lost" if conn.status == 0 else "cut", type(exc).__name__)
                conn = None
                continue
            finally:
                tally.open -= 1
            if status != 200:
                tally.record("errored", f"HTTP {status}")
                continue
            try:
                fault = stream_fault(conn.body(), tokens)
            except ValueError:
                fault = ("cut", "malformed chunked body")
            if fault:
                tally.record(*fault)
            else:
                tally.record("whole")
                if started >= window_from:
                    tally.length_s.append(time.perf_counter() - started)
                    tally.ttft_s.append((first or started) - started)
        if conn is not None:
            conn.transport.close()

    samples: list[tuple[float, int, int]] = []
    cpu: list[tuple[float, float, float]] = []
    procs = [0]

    async def sampler() -> None:
        """Samples from the window's start to just before its end (the last while every client still
        has a stream open), a progress line every 30 s."""
        for k in range(math.ceil(duration_s / sample_s)):
            at = window_from + k * sample_s
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            rss, procs[0] = resident_bytes(watched)
            samples.append((at - window_from, rss, tally.open))
            cpu.append((time.perf_counter(), sum(map(cpu_seconds, watched)), cpu_wait_s(watched)))
            if k % max(1, round(30 / sample_s)) == 0:
                print(f"  {at - window_from:6.0f} s: {tally.open} streams open, {tally.outcomes['whole']:,} whole, "
                      f"{sum(tally.outcomes.values()) - tally.outcomes['whole']} not, {rss / MIB:.1f} MiB", flush=True)

    watching = asyncio.create_task(sampler())
    await asyncio.gather(*[client(i) for i in range(streams)])
    await watching
    span_s = cpu[-1][0] - cpu[0][0] if len(cpu) > 1 else float("inf")
    return {"tally": tally, "samples": samples, "procs": procs[0], "cores": (cpu[-1][1] - cpu[0][1]) / span_s,
            "waiting_cores": (cpu[-1][2] - cpu[0][2]) / span_s}


def memory_verdict(samples: list[tuple[float, int, int]], duration_s: float) -> dict:
    """Start, peak, end (MiB), the second half's slope (MiB/min) and whether that is flat."""
    start, end = samples[0][1] / MIB, samples[-1][1] / MIB
    peak = max(rss for _, rss, _ in samples) / MIB
    half = [(t / 60, rss / MIB) for t, rss, _ in samples if t >= duration_s / 2]
    slope = statistics.linear_regression(*zip(*half)).slope if len(half) >= 2 else 0.0
    allowed = max(FLAT_MIB, FLAT_SHARE * start)
    growing = slope > GROWTH_MIB_PER_MIN and slope * duration_s / 2 / 60 > GROWTH_MIB
    return {"start": start, "peak": peak, "end": end, "slope": slope, "allowed": allowed,
            "flat": end - start <= allowed and not growing}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600, help="the measured window, after the warm-up")
    parser.add_argument("--streams", type=int, default=1000, help="streams open at every moment")
    parser.add_argument("--hub-processes", type=int, default=1)
    parser.add_argument("--server", default="uvicorn", choices=sorted(SERVERS), help="the hub's ASGI server")
    parser.add_argument("--engines", type=int, default=2, help="stub engines, each serving a model of its own")
    parser.add_argument("--tokens", type=int, default=200, help="content chunks per stream")
    parser.add_argument("--token-delay-ms", type=float, default=50.0)
    parser.add_argument("--warmup-s", type=float, default=30.0, help="not counted: every stream opened, caches warm")
    parser.add_argument("--sample-s", type=float, default=2.0, help="how often the hub's memory is read")
    parser.add_argument("--direct", action="store_true",
                        help="the control: streams straight to the engines, no hub (memory: the engines')")
    args = parser.parse_args()

    # Each stream holds a socket here, two in the hub and one in an engine.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * args.streams + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4 * args.streams + 256, hard), hard))
    stream_s = args.tokens * args.token_delay_ms / 1000
    stack = Stack()
    try:
        engines, engine_pids = [], []
        for i in range(args.engines):
            port = free_port()
            engine = stack.start([sys.executable, str(REPO / "bench/stub_engine.py"), "--port", str(port),
                                  "--tokens", str(args.tokens), "--token-delay-ms", str(args.token_delay_ms),
                                  "--full-stream"], f"http://127.0.0.1:{port}/health")
            stack.serving(f"soak-{i}", port)
            engines.append((f"http://127.0.0.1:{port}", f"soak-{i}"))
            engine_pids.append(engine.pid)
        if args.direct:
            targets, key, watched, what = engines, None, engine_pids, "the engines, no hub (the control)"
        else:
            url = stack.start_hub(args.server, args.hub_processes)
            targets, key, watched = [(url, model) for _, model in engines], stack.api_key(), [stack.hub.pid]
            what = f"one hub ({args.server}, {args.hub_processes} process{'es' if args.hub_processes > 1 else ''})"
        print(f"soak: {args.streams} streams at once through {what} to {args.engines} stub engine(s), {args.tokens} "
              f"tokens {args.token_delay_ms:g} ms apart (about {stream_s:.1f} s a stream); {args.warmup_s:g} s "
              f"warm-up, then {args.duration_s:g} s measured; {os.cpu_count()} cores for all of it", flush=True)
        engines_cpu_from = sum(map(cpu_seconds, engine_pids))
        began, own_cpu_from = time.monotonic(), time.process_time()
        result = uvloop.run(soak(targets, key, streams=args.streams, tokens=args.tokens, stream_s=stream_s,
                                 warmup_s=args.warmup_s, duration_s=args.duration_s, sample_s=args.sample_s,
                                 watched=watched))
        took_s = time.monotonic() - began
        engines_cores = (sum(map(cpu_seconds, engine_pids)) - engines_cpu_from) / took_s
        own_cores = (time.process_time() - own_cpu_from) / took_s
    finally:
        stack.close()

    tally, samples = result["tally"], result["samples"]
    faults = {kind: tally.outcomes[kind] for kind in ("lost", "cut", "errored")}
    open_counts = [open_ for _, _, open_ in samples]
    memory = memory_verdict(samples, args.duration_s)
    watched_name = "engines" if args.direct else "hub"
    print(f"streams completed whole: {tally.outcomes['whole']:,} in {took_s:.0f} s; started in the measured window: "
          f"{tally.in_window:,}, {tally.in_window / args.duration_s:.1f} requests/s "
          f"({tally.in_window * args.tokens / args.duration_s:,.0f} tokens/s)")
    print(f"stream length p50 {pct(tally.length_s, 50):.2f} s, p99 {pct(tally.length_s, 99):.2f} s (the engine "
          f"takes {stream_s:.2f} s); first bytes p50 {pct(tally.ttft_s, 50) * 1000:.1f} ms, "
          f"p99 {pct(tally.ttft_s, 99) * 1000:.1f} ms")
    print(f"streams open in the window: min {min(open_counts)}, mean {statistics.fmean(open_counts):.0f} "
          f"(of {args.streams})")
    print(f"lost {faults['lost']}, cut {faults['cut']}, errored {faults['errored']} (must be 0)"
          + (f": {', '.join(f'{why} x{n}' for why, n in tally.reasons.most_common())}" if tally.reasons else ""))
    print(f"CPU: {watched_name} {result['cores']:.2f} cores over the window (and {result['waiting_cores']:.2f} "
          "ready but waiting for a core)"
          + ("" if args.direct else f", stub engines {engines_cores:.2f}") + f", load generator {own_cores:.2f}")
    print(f"{watched_name} RSS ({result['procs']} process{'es' if result['procs'] > 1 else ''}, {len(samples)} "
          f"samples): start {memory['start']:.1f} MiB (after the warm-up), peak {memory['peak']:.1f}, end "
          f"{memory['end']:.1f} ({memory['end'] - memory['start']:+.1f}); second-half slope {memory['slope']:+.2f} "
          "MiB/min")
    print(f"memory flat: {'yes' if memory['flat'] else 'no'} (end within {memory['allowed']:.1f} MiB of the start, "
          f"and no growth over {GROWTH_MIB_PER_MIN:g} MiB/min adding more than {GROWTH_MIB:g} MiB in the second half)")
    return 0 if memory["flat"] and not any(faults.values()) else 1


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())

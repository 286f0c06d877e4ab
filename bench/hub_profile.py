"""Where the hub's CPU goes per request: the hub on a core of its own, 32 clients, the stub engine.

    python bench/hub_profile.py                 # streamed, 16 tokens per answer
    python bench/hub_profile.py --tokens 4      # with the default run: CPU per token and per request
    python bench/hub_profile.py --plain         # answers sent whole
    python bench/hub_profile.py --compare 3     # no profile: the judged hub against the limits hub

Two passes over one hub. The first measures the hub's CPU time per request (user and system,
from /proc) as it runs. The second sends the same load with Python's cProfile switched on in the
hub for that pass only (by signal) and prints, per request, the calls and the
own time of the packages and functions that take the most. The profiler slows the hub about
twofold and weighs call-heavy code more, so read its times as shares and its call counts as they
are. A profile this flat (nothing over a few per cent) says that no single change will cut much.

With --compare N, two hubs run side by side: the judged one (usage off, a key without limits) and
the limits one (usage on, a key under limits it never reaches), as gateway_overhead's rows run
them; each measured pass puts one of them on a core of its own, the two taking turns N times, and
the hub CPU per request of each pass is printed. A pass moves by about ±0.03 ms from the next, so
read the difference of the means of three or more.

The stub spaces the tokens so that every answer takes 32 ms, whatever the number of tokens: the
request rate stays the same, and runs with `--tokens 4` and `--tokens 16` split the CPU per
request into a fixed part and a part per token, (cpu16 - cpu4) / 12 per token.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pstats
import signal
import sys
import time
from pathlib import Path

from harness import REPO, LoadClient, Stack, apply_layout, cpu_seconds, layouts, load, summary

CLIENTS = 32
ANSWER_MS = 32  # the stub's answer time, as in bench/gateway_overhead.py: 16 tokens 2 ms apart
PACKAGES = ("uvicorn", "uvloop", "httptools", "aiohttp", "django", "asgiref", "asyncio", "porten/", "fleet/", "catalog/",
            "json")


def serve_profiled(stats_path: str, argv: list[str]) -> None:
    """The hub (uvicorn, one process, as the harness starts it), with cProfile on its event-loop
    thread switched on by SIGUSR1 and written to `stats_path` by SIGUSR2. `argv`: --host H --port P."""
    import cProfile

    import uvicorn

    profile = cProfile.Profile()

    def write(*_) -> None:
        profile.disable()
        profile.dump_stats(stats_path + ".part")
        os.replace(stats_path + ".part", stats_path)  # whole when it appears

    signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
    signal.signal(signal.SIGUSR2, write)
    options = dict(zip(argv[::2], argv[1::2]))
    uvicorn.run("porten.asgi:application", host=options["--host"], port=int(options["--port"]), loop="uvloop",
                http="httptools", lifespan="on")


def package(where: tuple[str, int, str]) -> str:
    filename, _, name = where
    if filename == "~":
        return "built-in: " + name.strip("<>").replace("built-in method ", "").split(" of ")[0]
    return next((p.rstrip("/") for p in PACKAGES if p in filename), Path(filename).name)


def report(stats_path: Path, requests: int, top: int) -> None:
    # epoll's poll is the loop waiting for work (its time is the wait), not work
    stats = {where: row for where, row in pstats.Stats(str(stats_path)).stats.items()
             if not (where[0] == "~" and "of 'select.epoll'" in where[2])}
    own_s = sum(row[2] for row in stats.values())
    calls = sum(row[1] for row in stats.values())
    print(f"\nProfiled ({requests} requests): {calls / requests:.0f} calls and {own_s / requests * 1e6:.0f} µs "
          "of profiled time per request (waits in epoll left out)")
    by_package, package_calls = collections.Counter(), collections.Counter()
    for where, row in stats.items():
        by_package[package(where)] += row[2]
        package_calls[package(where)] += row[1]
    print(f"\n{'share':>6} {'calls/req':>10}  package")
    for name, spent in by_package.most_common(12):
        print(f"{spent / own_s:>6.1%} {package_calls[name] / requests:>10.1f}  {name}")
    print(f"\n{'share':>6} {'calls/req':>10}  function (own time)")
    for where, row in sorted(stats.items(), key=lambda item: -item[1][2])[:top]:
        filename = where[0].split("site-packages/")[-1].replace(str(REPO) + "/", "")
        print(f"{row[2] / own_s:>6.1%} {row[1] / requests:>10.2f}  {where[2]} ({filename}:{where[1]})")


async def passes(hub: str, key: str, pid: int, *, stream: bool, tokens: int, requests: int, profiled: int,
                 stats_path: Path) -> None:
    client = LoadClient()
    try:
        warm = await load(hub, model="stub-model", concurrency=CLIENTS, requests=400, stream=stream, api_key=key,
                          max_tokens=tokens, client=client)
        spread_s = summary(warm)["p50_ms"] / 1000
        before, started = cpu_seconds(pid), time.perf_counter()
        sample = await load(hub, model="stub-model", concurrency=CLIENTS, requests=requests, stream=stream,
                            api_key=key, max_tokens=tokens, spread_s=spread_s, client=client)
        spent, elapsed = cpu_seconds(pid) - before, time.perf_counter() - started
        result = summary(sample)
        print(f"{'stream' if stream else 'plain'}, {tokens} tokens, {CLIENTS} clients, {requests} requests: "
              f"hub CPU {spent / requests * 1000:.3f} ms per request, {spent / elapsed:.2f} of its core busy, "
              f"{requests / elapsed:.0f} requests/s, p50 {result['p50_ms']:.2f} ms, errors {result['errors']}")

        os.kill(pid, signal.SIGUSR1)
        await load(hub, model="stub-model", concurrency=CLIENTS, requests=profiled, stream=stream, api_key=key,
                   max_tokens=tokens, spread_s=spread_s, client=client)
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not stats_path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def cpu_pass(hub: str, key: str, pid: int, *, stream: bool, tokens: int, requests: int) -> tuple[float, float]:
    """One measured pass: (the hub's CPU ms per request, the p50 ms)."""
    client = LoadClient()
    try:
        warm = await load(hub, model="stub-model", concurrency=CLIENTS, requests=400, stream=stream, api_key=key,
                          max_tokens=tokens, client=client)
        before = cpu_seconds(pid)
        sample = await load(hub, model="stub-model", concurrency=CLIENTS, requests=requests, stream=stream,
                            api_key=key, max_tokens=tokens, spread_s=summary(warm)["p50_ms"] / 1000, client=client)
        return (cpu_seconds(pid) - before) / requests * 1000, summary(sample)["p50_ms"]
    finally:
        await client.aclose()


def compare(stack: Stack, rounds: int, *, stream: bool, tokens: int, requests: int) -> None:
    hubs = {"judged": (stack.start_hub(PORTEN_USAGE_ENABLED="0"), stack.api_key(), stack.hub.pid)}
    hubs["limits"] = (stack.start_hub(PORTEN_USAGE_ENABLED="1"), stack.api_key(rpm_limit=10**9, tpm_limit=10**9),
                      stack.hub.pid)
    passes: dict[str, list[tuple[float, float]]] = {name: [] for name in hubs}
    for turn in range(rounds):
        for name in hubs if turn % 2 == 0 else reversed(hubs):
            url, key, pid = hubs[name]
            apply_layout(layouts([pid])[-1][1])
            passes[name].append(asyncio.run(cpu_pass(url, key, pid, stream=stream, tokens=tokens, requests=requests)))
    print(f"{'stream' if stream else 'plain'}, {tokens} tokens, {CLIENTS} clients, {requests} requests a pass, "
          "hub CPU ms per request (p50 ms):")
    for name, rows in passes.items():
        mean = sum(cpu for cpu, _ in rows) / len(rows)
        print(f"  {name:<7} " + "  ".join(f"{cpu:.3f} ({p50:.2f})" for cpu, p50 in rows) + f"   mean {mean:.3f}")
    gap = [sum(cpu for cpu, _ in passes[name]) / rounds for name in hubs]
    print(f"  limits and usage cost {(gap[1] - gap[0]) * 1000:+.0f} µs of hub CPU per request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer, spread over 32 ms")
    parser.add_argument("--plain", action="store_true", help="answers sent whole (stream false)")
    parser.add_argument("--requests", type=int, default=6000, help="requests in the measured pass")
    parser.add_argument("--profiled", type=int, default=2000, help="requests in the profiled pass")
    parser.add_argument("--top", type=int, default=30, help="functions to list")
    parser.add_argument("--limits", action="store_true",
                        help="usage accounting on and a key under limits it never reaches (gateway_overhead's "
                             "porten+limits row); without it, both off (its judged row)")
    parser.add_argument("--compare", type=int, default=0, metavar="ROUNDS",
                        help="no profile: CPU per request of the judged hub against the limits hub, in turns")
    args = parser.parse_args()

    stack = Stack()
    try:
        stack.start_stub("stub-model", tokens=args.tokens, token_delay_ms=ANSWER_MS / args.tokens)
        if args.compare:
            return compare(stack, args.compare, stream=not args.plain, tokens=args.tokens, requests=args.requests)
        stats_path = stack.workdir / "hub.pstats"
        hub = stack.start_hub(command=[sys.executable, str(Path(__file__).resolve()), "--hub", str(stats_path)],
                              PORTEN_USAGE_ENABLED="1" if args.limits else "0")
        key = stack.api_key(rpm_limit=10**9, tpm_limit=10**9) if args.limits else stack.api_key()
        apply_layout(layouts([stack.hub.pid])[-1][1])  # the hub on a core of its own, where there are two
        asyncio.run(passes(hub, key, stack.hub.pid, stream=not args.plain, tokens=args.tokens,
                           requests=args.requests, profiled=args.profiled, stats_path=stats_path))
        report(stats_path, args.profiled, args.top)
    finally:
        stack.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hub"]:
        serve_profiled(sys.argv[2], sys.argv[3:])
    else:
        os.chdir(REPO)
        main()

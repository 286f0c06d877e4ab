"""What rate limits and usage accounting add to the added p50 under open-loop load: requests arrive
at random at a fixed rate (harness.load_open), not from clients that wait for their last answer.

    python bench/limits_open_loop.py                       # streams at 500 and 800 a second, shared cores
    python bench/limits_open_loop.py --plain --rates 800   # whole answers
    python bench/limits_open_loop.py --own-core            # each hub on a core of its own

Targets, each its own hub process against the stub engine (16 tokens, 2 ms apart): direct, the judged
hub (usage off, a key without limits), the limits hub (usage on, a key under limits it never
reaches, as gateway_overhead's porten+limits) and a second judged hub (the control: how far two
identical hubs land apart). They take turns (--turns, in one order then the reverse), each turn
--seconds long after a short warm-up. gateway_overhead.py's 32 clients fall into step with each
other over a turn, and how fast they do moves its 32-client rows by up to about 1 ms from run to
run (docs/performance.md); arrivals at random do not line up that way.
"""
from __future__ import annotations

import argparse
import asyncio
import os

from harness import REPO, LoadClient, Sample, Stack, apply_layout, cpu_seconds, layouts, load_open, pct, summary

TARGET_LIMITS_MS = 0.3  # as in gateway_overhead.py


def measure(targets: dict, pids: dict, *, rate: float, stream: bool, turns: int, seconds: float) -> dict:
    samples = {name: Sample() for name in targets}
    cpu_s = dict.fromkeys(pids, 0.0)

    async def turn(name: str) -> None:
        url, key = targets[name]
        client = LoadClient()
        try:
            await load_open(url, model="stub-model", rate=rate, seconds=0.3, stream=stream, api_key=key, client=client)
            before = cpu_seconds(pids[name]) if name in pids else 0.0
            part = await load_open(url, model="stub-model", rate=rate, seconds=seconds, stream=stream, api_key=key,
                                   client=client)
            if name in pids:
                cpu_s[name] += cpu_seconds(pids[name]) - before
        finally:
            await client.aclose()
        samples[name].latencies_s += part.latencies_s
        samples[name].errors += part.errors
        samples[name].failures += part.failures

    names = list(targets)
    for number in range(turns):
        for name in names if number % 2 == 0 else reversed(names):
            asyncio.run(turn(name))
    results = {name: {**summary(sample), "p90_ms": pct(sample.latencies_s, 90) * 1000}
               for name, sample in samples.items()}
    for name, spent in cpu_s.items():
        results[name]["cpu_ms"] = spent / max(results[name]["n"], 1) * 1000
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="500,800", help="arrivals a second, comma-separated")
    parser.add_argument("--plain", action="store_true", help="whole answers (default: streams)")
    parser.add_argument("--own-core", action="store_true", help="each hub on a core of its own while measured")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0, help="the length of each measured turn")
    args = parser.parse_args()

    stack = Stack()
    try:
        stub_port = stack.start_stub("stub-model")
        key, limited = stack.api_key(), stack.api_key(rpm_limit=10**9, tpm_limit=10**9)
        targets = {"direct": (f"http://127.0.0.1:{stub_port}", None)}
        pids = {}
        for name, usage, caller in (("judged", "0", key), ("limits", "1", limited), ("again", "0", key)):
            targets[name] = (stack.start_hub("uvicorn", 1, PORTEN_USAGE_ENABLED=usage), caller)
            pids[name] = stack.hub.pid
        layout_name, layout = layouts(list(pids.values()))[-1 if args.own_core else 0]
        apply_layout(layout)
        mode = "plain" if args.plain else "stream"
        print(f"Open-loop arrivals, {mode}, {layout_name}, {args.turns} turns of {args.seconds:g} s per target; "
              f"{os.cpu_count()} cores.")
        header = f"{'rate/s':>7} {'target':<8}{'n':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>7}" \
                 f"{'added p50':>11}{'cpu/req':>9}"
        print(header)
        print("-" * len(header))
        for rate in (float(r) for r in args.rates.split(",")):
            results = measure(targets, pids, rate=rate, stream=not args.plain, turns=args.turns, seconds=args.seconds)
            base = results["direct"]["p50_ms"]
            for name, r in results.items():
                cpu = f"{r['cpu_ms']:.3f}" if "cpu_ms" in r else "-"
                print(f"{rate:>7.0f} {name:<8}{r['n']:>7}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                      f"{r['errors']:>7}{r['p50_ms'] - base:>+11.2f}{cpu:>9}")
            extra = results["limits"]["p50_ms"] - results["judged"]["p50_ms"]
            control = results["again"]["p50_ms"] - results["judged"]["p50_ms"]
            print(f"  limits and usage on: {extra:+.2f} ms added p50 over the judged hub (target at most "
                  f"+{TARGET_LIMITS_MS:g} ms): {'met' if extra <= TARGET_LIMITS_MS else 'missed'}; "
                  f"the same hub twice: {control:+.2f} ms")
    finally:
        stack.close()


if __name__ == "__main__":
    os.chdir(REPO)
    main()

"""What Porten adds to a request: the same requests straight to an engine and through Porten
(and through LiteLLM's proxy, the peer, and a bare byte relay, the floor), non-streaming and streaming, at 1 and 32 clients.

    python bench/gateway_overhead.py            # stub engine (measures Porten alone) + LiteLLM peer
    python bench/gateway_overhead.py --llama    # adds a second run against real llama.cpp (Gemma 3 270M)
    python bench/gateway_overhead.py --servers uvicorn:1,uvicorn:2,granian:1,granian:2,daphne:1
                                                # the hub under several ASGI servers and process counts, side by side

Porten's targets are named after the server the hub runs under and its processes (`uvicorn*2`: two
uvicorn workers). The first one named is the one judged against the target.

Each table also measures bench/byte_pipe.py, a relay that only copies bytes: what it adds is the
cost of one more process and hop on this machine, the floor under any proxy's figure.

cpu/req is the CPU time (user and system) the proxy's process and its children spent per measured
request: unlike latency on a shared machine, it does not move with how the kernel happens to
schedule the processes.

In each row the targets take turns (--rounds, 2 by default: direct, pipe, Porten, LiteLLM, then the
reverse), each warming up before its turn, and each target's figures pool its turns, so that a
slow moment of the machine falls on every target. --rounds 1 measures each target once, one after
the other.

Each table runs twice: with every process free to use every core, and with the proxy (the pipe,
Porten, LiteLLM, measured one at a time) on a core of its own while the load generator and the engine share the rest; the second is
how a hub runs in production, where clients are elsewhere (bench/harness.py: layouts).

LiteLLM runs from its own virtualenv (`pip install 'litellm[proxy]'` into
~/.cache/porten-bench/litellm-venv, or pass --litellm PATH-TO-litellm); without it the peer column is skipped.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from harness import (REPO, LoadClient, Sample, Stack, apply_layout, cpu_seconds, free_port, layouts, load,
                     summary)

DEFAULT_LITELLM = Path.home() / ".cache/porten-bench/litellm-venv/bin/litellm"


LITELLM_KEY = "sk-porten-bench-" + "0" * 32


def start_litellm(stack: Stack, binary: Path, upstream: str, model: str) -> tuple[str, int] | None:
    if not binary.exists():
        print(f"(LiteLLM not found at {binary}: peer column skipped)")
        return None
    port = free_port()
    config = Path(tempfile.mkdtemp()) / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
    )
    proc = stack.start([str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                        "--num_workers", "1"], f"http://127.0.0.1:{port}/health/liveliness", LITELLM_TELEMETRY="False",
                       LITELLM_LOG="ERROR", LITELLM_MASTER_KEY=LITELLM_KEY)
    return f"http://127.0.0.1:{port}", proc.pid


# Against the stub engine: added p50 at most 2 ms at one client, a ratio of at most 1.10 at 32 and
# more clients, and at least 5x less added latency than LiteLLM's proxy in every row.
TARGET_ADDED_MS, TARGET_RATIO, TARGET_VS_PEER = 2.0, 1.10, 5.0
TARGET_LIMITS_MS = 0.3  # what rate limits and usage accounting may add to the added p50


ROUNDS = 2  # each target's requests come in this many turns (see measure_row)


async def measure_row(targets: dict[str, tuple[str, str | None]], *, model: str, stream: bool, clients: int,
                      requests: int, max_tokens: int, pids: dict[str, int], rounds: int) -> dict[str, dict]:
    """One row: `requests` per round for each target, the targets taking turns, in one order and
    then the reverse (direct, pipe, Porten, LiteLLM, then LiteLLM, Porten, pipe, direct...), each
    over its own connections and after a few calls of its own to warm up (not counted): a
    target's second turn comes after the others', when the first call after a quiet spell is slow
    for any process and Porten's per-process caches have run out (docs/performance.md)."""
    opened = {name: LoadClient() for name in targets}
    try:
        spread_s = 0.0  # the clients' starts spread over one answer straight from the engine (harness.load)
        samples = {name: Sample() for name in targets}
        cpu_s = dict.fromkeys(pids, 0.0)
        names = list(targets)
        for turn in range(rounds):
            for name in names if turn % 2 == 0 else reversed(names):
                url, key = targets[name]
                warm = await load(url, model=model, concurrency=clients, requests=max(clients, requests // 10),
                                  stream=stream, api_key=key, max_tokens=max_tokens, client=opened[name])
                spread_s = spread_s or summary(warm)["p50_ms"] / 1000
                cpu_before = cpu_seconds(pids[name]) if name in pids else None
                part = await load(url, model=model, concurrency=clients, requests=requests, stream=stream,
                                  api_key=key, max_tokens=max_tokens, spread_s=spread_s, client=opened[name])
                if cpu_before is not None:
                    cpu_s[name] += cpu_seconds(pids[name]) - cpu_before
                samples[name].latencies_s += part.latencies_s
                samples[name].ttft_s += part.ttft_s
                samples[name].errors += part.errors
                samples[name].failures += part.failures
    finally:
        for client in opened.values():
            await client.aclose()
    results = {name: summary(sample) for name, sample in samples.items()}
    for name, spent_s in cpu_s.items():
        results[name]["cpu_ms"] = spent_s / (requests * rounds) * 1000
    return results


def run_table(title: str, targets: dict[str, tuple[str, str | None]], model: str, plan: list[tuple[bool, int, int]],
              max_tokens: int, pids: dict[str, int], judge: bool = False, rounds: int = ROUNDS) -> None:
    """`plan`: (stream, clients, requests per round) rows. `pids`: the process of each proxy target,
    whose CPU time per request is shown (cpu/req). With `judge`, a last line says which rows meet
    the target: Porten's added p50 under TARGET_ADDED_MS, its ratio at most TARGET_RATIO, and ahead
    of LiteLLM when it ran."""
    print(f"\n== {title} ==")
    header = f"{'mode':<10}{'clients':>8} {'target':<14}{'p50 ms':>9}{'p99 ms':>9}{'TTFT p50':>10}{'errors':>7}" \
             f"{'added p50':>11}{'ratio':>7}{'cpu/req':>9}"
    print(header)
    print("-" * len(header))
    missed, limit_costs = [], []
    for stream, clients, requests in plan:
        results = asyncio.run(measure_row(targets, model=model, stream=stream, clients=clients, requests=requests,
                                          max_tokens=max_tokens, pids=pids, rounds=rounds))
        base = results["direct"]
        for name, r in results.items():
            added = r["p50_ms"] - base["p50_ms"]
            ratio = r["p50_ms"] / base["p50_ms"]
            ttft = f"{r['ttft_p50_ms']:.2f}" if r["ttft_p50_ms"] is not None else "-"
            cpu = f"{r['cpu_ms']:.2f}" if "cpu_ms" in r else "-"
            print(f"{'stream' if stream else 'plain':<10}{clients:>8} {name:<14}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                  f"{ttft:>10}{r['errors']:>7}{added if name != 'direct' else 0:>+11.2f}{ratio:>7.3f}{cpu:>9}")
        for name, r in results.items():
            if r["failures"]:
                print(f"  ({name}'s errors: {', '.join(f'{why} x{n}' for why, n in r['failures'].items())})")
        judged = next(name for name in results if name.startswith("porten"))
        porten, peer = results[judged], results.get("litellm")
        if "porten+limits" in results:
            extra = results["porten+limits"]["p50_ms"] - porten["p50_ms"]
            limit_costs.append(extra)
            print(f"  limits and usage on: {extra:+.2f} ms added p50 over {judged} (target at most "
                  f"+{TARGET_LIMITS_MS:g} ms): {'met' if extra <= TARGET_LIMITS_MS else 'missed'}")
        if "porten-again" in results:
            control = results["porten-again"]["p50_ms"] - porten["p50_ms"]
            print(f"  the same hub twice: {control:+.2f} ms added p50 of porten-again over {judged} "
                  "(what this row's comparisons move by chance)")
        added = porten["p50_ms"] - base["p50_ms"]
        ratio = porten["p50_ms"] / base["p50_ms"]
        peer_added = peer["p50_ms"] - base["p50_ms"] if peer is not None else None
        if porten["errors"] or (clients == 1 and added > TARGET_ADDED_MS) or (clients > 1 and ratio > TARGET_RATIO) \
                or (peer_added is not None and peer_added < TARGET_VS_PEER * max(added, 0.0)):
            missed.append(f"{'stream' if stream else 'plain'} at {clients} ({added:+.2f} ms, {ratio:.3f}"
                          + (f", LiteLLM {peer_added:+.2f} ms" if peer_added is not None else "") + ")")
    if judge:
        print(f"{judged} against the target (added p50 at most {TARGET_ADDED_MS:g} ms at 1 client, ratio <= "
              f"{TARGET_RATIO} at more, {TARGET_VS_PEER:g}x less added than LiteLLM): met in "
              f"{len(plan) - len(missed)} of {len(plan)} rows" + (f"; missed: {', '.join(missed)}" if missed else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama", action="store_true", help="also run against a real llama.cpp engine")
    parser.add_argument("--litellm", type=Path, default=DEFAULT_LITELLM)
    parser.add_argument("--requests", type=int, default=400, help="requests per round at 32 clients")
    parser.add_argument("--servers", default="uvicorn:1",
                        help="the hub's ASGI servers and process counts, comma-separated SERVER:PROCESSES "
                             "(uvicorn, granian, daphne); the first is judged")
    parser.add_argument("--many", type=int, default=0,
                        help="also a row at this many clients (256, say), to see what extra processes bring")
    parser.add_argument("--limits", action="store_true",
                        help="add a row target with rate limits and usage accounting on (porten+limits)")
    parser.add_argument("--control", action="store_true",
                        help="add a second hub configured as the judged one (porten-again): the noise floor of "
                             "the comparisons between Porten targets")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="turns the targets take in each row (1: each measured once, one after the other)")
    args = parser.parse_args()

    stack = Stack()
    try:
        stub_port = stack.start_stub("stub-model")
        key = stack.api_key()
        direct = f"http://127.0.0.1:{stub_port}"
        pipe_port = free_port()
        pipe = stack.start([sys.executable, str(REPO / "bench/byte_pipe.py"), "--upstream-port", str(stub_port),
                            "--port", str(pipe_port)], f"http://127.0.0.1:{pipe_port}/health")
        targets = {"direct": (direct, None), "pipe": (f"http://127.0.0.1:{pipe_port}", None)}
        pids = {"pipe": pipe.pid}
        for spec in args.servers.split(","):
            server, _, processes = spec.partition(":")
            name = f"porten-{server}*{processes or 1}"
            # Judged on the gateway alone: usage accounting off here, measured in the --limits row.
            targets[name] = (stack.start_hub(server, int(processes or 1), PORTEN_USAGE_ENABLED="0"), key)
            pids[name] = stack.hub.pid
        if args.limits:
            # The same hub with usage accounting on, called with a key under limits it never reaches:
            # each request takes from its Redis buckets and settles on the engine's usage.
            server, _, processes = args.servers.split(",")[0].partition(":")
            limited_key = stack.api_key(rpm_limit=10**9, tpm_limit=10**9)
            targets["porten+limits"] = (stack.start_hub(server, int(processes or 1)), limited_key)
            pids["porten+limits"] = stack.hub.pid
        if args.control:
            # A second hub configured as the judged one: how far two identical targets land apart.
            server, _, processes = args.servers.split(",")[0].partition(":")
            targets["porten-again"] = (stack.start_hub(server, int(processes or 1), PORTEN_USAGE_ENABLED="0"), key)
            pids["porten-again"] = stack.hub.pid
        hub, hub_pid = next((url, pids[name]) for name, (url, _) in targets.items() if name.startswith("porten"))
        litellm = start_litellm(stack, args.litellm, direct, "stub-model")
        if litellm:
            targets["litellm"] = (litellm[0], LITELLM_KEY)  # both proxies check a key
            pids["litellm"] = litellm[1]
        proxies = list(pids.values())
        print(f"Stub engine: 16 tokens, 2 ms apart (about 32 ms per answer); {os.cpu_count()} cores for the load "
              "generator, the engine and the proxy (the pipe, Porten or LiteLLM), in each layout below.")
        one_client = 200 // args.rounds  # 200 calls in all, as before rounds
        plan = [(False, 1, one_client), (False, 32, args.requests), (True, 1, one_client), (True, 32, args.requests)]
        if args.many:
            plan += [(False, args.many, args.many * 4), (True, args.many, args.many * 4)]
        for layout_name, layout in layouts(proxies):
            apply_layout(layout)
            run_table(f"stub engine, {layout_name}", targets, "stub-model", plan, max_tokens=16, pids=pids, judge=True,
                      rounds=args.rounds)
        apply_layout(layouts(proxies)[0][1])

        if args.llama:
            sys.path.insert(0, str(REPO))
            from fleet.agent.engines import engine_for
            from fleet.agent.engines.base import EngineLaunch
            from fleet.agent.engines.process import start_engine, stop_engine, wait_until_healthy
            from tests.support.small_model import gemma_gguf_path

            engine = engine_for("llamacpp")
            launch = EngineLaunch(instance_id=0, node_name="bench", served_model_name="gemma-3-270m",
                                  model_path=gemma_gguf_path(), context_length=512, port=free_port(),
                                  chat_format="gemma")
            proc = start_engine(engine, launch, log_path=stack.workdir / "llama.log")
            try:
                wait_until_healthy(engine, launch, proc, timeout_s=120)
                stack.serving("gemma-3-270m", launch.port, slots=1)
                llama_targets = {"direct": (f"http://127.0.0.1:{launch.port}", None), "porten": (hub, key)}
                print("\nllama.cpp (llama-cpp-python server), Gemma 3 270M on the CPU, 8 tokens per answer:")
                # Not streaming with several clients: llama-cpp-python's server hangs on concurrent
                # streams even when called directly (seen with 0.3.36), so that row measures nothing.
                for layout_name, layout in layouts([hub_pid]):
                    apply_layout(layout)
                    run_table(f"llama.cpp, {layout_name}", llama_targets, "gemma-3-270m",
                              [(False, 1, 30 // args.rounds), (False, 4, 30 // args.rounds), (True, 1, 30 // args.rounds)],
                              max_tokens=8, rounds=args.rounds,
                              pids={"porten": hub_pid})
            finally:
                stop_engine(proc.pid)
    finally:
        stack.close()


if __name__ == "__main__":
    os.chdir(REPO)
    main()

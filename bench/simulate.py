"""Replay days of requests against a small fleet under Porten's policy and two baselines.

Assumptions (the same for every policy):
- Fleet: 4 nodes, each 2 GPUs of 80 GB (81,920 MB). Nothing else holds GPU memory.
- Catalog: the table below; 5 real footprints and 7 synthetic ones (prefixed `syn-`). Together
  a little more than the fleet's memory, and the three over 80 GB take a whole node each, so
  the catalog never fits at once. Weights on disk are 85 % of the footprint (the rest is KV
  cache and runtime).
- Download at 400 MB/s; once on a node's disk, weights stay there (for every policy).
- Engine start: 2 s + 1 s per 2 GB of footprint. Eviction (drain + stop) is instant.
- Engines serve any number of requests at once; a request waits only for its model to be
  ready. A request arriving while its model loads (or waits for room) waits until it is ready.
- Trace: 86,400 s a day, 5 days from 5 fixed seeds; every policy replays the same days.
  Sessions start at a diurnal rate (peak mid-afternoon, a fifth of it at night, about one
  every 12 s on average); each picks a model by Zipf popularity (s = 1.1) over a random
  ranking of the catalog and sends a geometric number of requests (mean 4) about a minute
  apart. On top of that, 30 bursts a day (a script hammering one model, chosen uniformly,
  20-80 requests within a few minutes).

Policies:
- porten (as shipped): demand is requests over the 600 s window, each weighted by how recent it
  is (planner.recency_weight); idle models unload after the window; a model that does not fit is
  placed by planner.place() (demand-aware eviction, 120 s minimum residency, weights on disk
  preferred). A request place() cannot serve yet ("busy") waits, is retried every 2 s as the
  gateway does, and counts as one more request per 5 s waited (aging, PORTEN_BUSY_AGING_S).
  Every 30 s (the beat sweep, PORTEN_IDLE_SWEEP_S) idle models unload, and models
  evicted for room in the last hour come back into free memory, never by evicting
  (fleet.placement.instances_restore_evicted).
- porten-flat: flat request counts and no restore (the policy as first shipped, but with
  today's eviction rule).
- porten-strict: as shipped, without aging (a busy request's demand never grows).
- porten-prefetch: as shipped, plus free memory prefilled with the most requested absent models of
  the last hour (an experiment, not built into the hub: it would reload the very models the
  demand window just unloaded for idleness).
- lru-ttl (Ollama-like): unload after 5 minutes idle; when full, evict least recently used.
- swap-lru (llama-swap-like): never unload while idle; when full, evict least recently used
  just enough to fit.
The baselines choose among nodes that fit without eviction exactly as Porten does (weights on
disk first, then best fit), so only the eviction policy differs.

Run from the repository root: python bench/simulate.py [--days N]
"""

from __future__ import annotations

import heapq
import math
import random
import sys
from collections import defaultdict, deque
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet.planner import (  # noqa: E402
    Demand,
    GpuState,
    LoadedInstance,
    ModelSpec,
    NodeState,
    Placement,
    idle_instances,
    place,
    recency_weight,
    split_options,
)

# model id, footprint in GB
CATALOG_GB = [
    ("gemma-3-270m", 1),
    ("qwen2.5-7b", 17),
    ("deepseek-r1-distill-qwen-14b", 34),
    ("qwen2.5-coder-32b", 70),
    ("qwen3-coder-next", 160),
    ("syn-small-3b", 8),
    ("syn-chat-9b", 20),
    ("syn-mid-12b", 28),
    ("syn-mid-22b", 48),
    ("syn-vision-27b", 58),
    ("syn-moe-100b", 100),
    ("syn-large-70b", 145),
]

NODES = 4
GPUS_PER_NODE = 2
GPU_MB = 80 * 1024
DAY_S = 86_400.0
RETRY_S = 2.0  # fleet.gateway.BUSY_RETRY_S: a request waiting for room asks the planner again
SWEEP_S = 30.0  # PORTEN_IDLE_SWEEP_S: beat unloads idle models (and restores evicted ones)
DOWNLOAD_MB_S = 400.0
DEMAND_WINDOW_S = 600.0
MIN_RESIDENCY_S = 120.0
LRU_TTL_S = 300.0
PREFETCH_HORIZON_S = 3_600.0
RESTORE_HORIZON_S = 3_600.0  # fleet.placement.RESTORE_HORIZON_S
RESTORE_PER_SWEEP = 3  # fleet.placement.RESTORE_PER_SWEEP
MEAN_SESSION_GAP_S = 12.0
ZIPF_S = 1.1
SEED = 20_251_127  # day d replays the trace of seed SEED + d
DAYS = 5
AGING_S = 5.0  # PORTEN_BUSY_AGING_S: a request left waiting for room counts once more this often
TARGET_REDUCTION = 0.30


@dataclass(frozen=True)
class CatalogEntry:
    spec: ModelSpec
    disk_mb: int


def catalog() -> dict[str, CatalogEntry]:
    entries = {}
    for model_id, gb in CATALOG_GB:
        vram = gb * 1024
        disk = int(vram * 0.85)
        spec = ModelSpec(
            model_id=model_id,
            vram_mb=vram,
            load_s=2.0 + gb / 2.0,
            download_s=disk / DOWNLOAD_MB_S,
        )
        entries[model_id] = CatalogEntry(spec, disk)
    return entries


def make_trace(models: list[str], seed: int) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    ranking = models[:]
    rng.shuffle(ranking)
    weights = [1 / (rank**ZIPF_S) for rank in range(1, len(ranking) + 1)]

    def rate(t: float) -> float:
        # Sessions per second: peak at 15:00, a fifth of it at 03:00.
        day = (1 - math.cos(2 * math.pi * (t - 3 * 3600) / DAY_S)) / 2
        return (0.2 + 0.8 * day) / MEAN_SESSION_GAP_S * 1.6

    trace: list[tuple[float, str]] = []
    peak = rate(15 * 3600)
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= DAY_S:
            break
        if rng.random() > rate(t) / peak:
            continue
        model = rng.choices(ranking, weights)[0]
        at = t
        while at < DAY_S:
            trace.append((at, model))
            if rng.random() < 0.25:  # geometric session length, mean 4
                break
            at += rng.expovariate(1 / 60.0)
    for _ in range(30):
        start = rng.uniform(0, DAY_S - 600)
        model = rng.choice(models)
        for _ in range(rng.randint(20, 80)):
            trace.append((start + rng.uniform(0, rng.uniform(60, 300)), model))
    trace.sort()
    return trace


@dataclass
class Instance:
    iid: int
    model_id: str
    node: int
    gpus: tuple[int, ...]
    vram_mb: int
    placed_at: float
    ready_at: float
    last_used: float
    reload_s: float


@dataclass
class Stats:
    loads: int = 0
    downloads: int = 0
    waited_requests: int = 0
    wait_s: float = 0.0
    idle_unloads: int = 0
    evictions: int = 0
    prefetches: int = 0
    waits: list[float] = field(default_factory=list)


class Fleet:
    """The simulated fleet: instances per node, weights on each node's disk."""

    def __init__(self, entries: dict[str, CatalogEntry]) -> None:
        self.entries = entries
        self.instances: dict[str, Instance] = {}
        self.disk: list[set[str]] = [set() for _ in range(NODES)]
        self.next_id = 0

    def free_mb(self, node: int, gpu: int) -> int:
        used = sum(
            -(-i.vram_mb // len(i.gpus)) for i in self.instances.values() if i.node == node and gpu in i.gpus
        )
        return GPU_MB - used

    def snapshot(self, now: float) -> list[NodeState]:
        nodes = []
        for n in range(NODES):
            loaded = tuple(
                LoadedInstance(
                    instance_id=i.iid,
                    model_id=i.model_id,
                    vram_mb=i.vram_mb,
                    gpu_indices=i.gpus,
                    loaded_at_s=i.ready_at if i.ready_at <= now else i.placed_at,
                    reload_s=i.reload_s,
                    evictable=i.ready_at <= now,
                )
                for i in self.instances.values()
                if i.node == n
            )
            nodes.append(
                NodeState(
                    name=str(n),
                    gpus=tuple(GpuState(g, GPU_MB, self.free_mb(n, g)) for g in range(GPUS_PER_NODE)),
                    instances=loaded,
                    models_on_disk=frozenset(self.disk[n]),
                )
            )
        return nodes

    def start(self, model_id: str, node: int, gpus: tuple[int, ...], now: float, stats: Stats) -> Instance:
        spec = self.entries[model_id].spec
        ready = now + spec.load_s
        if model_id not in self.disk[node]:
            ready += spec.download_s
            self.disk[node].add(model_id)
            stats.downloads += 1
        inst = Instance(self.next_id, model_id, node, gpus, spec.vram_mb, now, ready, now, spec.load_s)
        self.next_id += 1
        self.instances[model_id] = inst
        stats.loads += 1
        return inst

    def remove(self, model_id: str) -> None:
        del self.instances[model_id]

    def fit_without_eviction(self, model_id: str, now: float) -> Placement | None:
        """The shared no-eviction choice: weights on disk first, then best fit."""
        result = place(self.entries[model_id].spec, self.snapshot(now), Demand({}), now_s=now)
        return result if isinstance(result, Placement) and not result.evict else None


class Policy:
    name = ""

    def __init__(self, fleet: Fleet, stats: Stats) -> None:
        self.fleet = fleet
        self.stats = stats
        self.window: dict[str, deque[float]] = defaultdict(deque)
        self.history: dict[str, deque[float]] = defaultdict(deque)
        self.last_request: dict[str, float] = {}
        self.waiting: dict[str, list[float]] = {}  # set by the simulator

    def record(self, model_id: str, now: float) -> None:
        self.window[model_id].append(now)
        self.history[model_id].append(now)
        self.last_request[model_id] = now

    recency_weighted = True  # as the hub does (fleet.demand.demand_recent)

    def demand(self, now: float, horizon_s: float = DEMAND_WINDOW_S) -> Demand:
        """Requests per model over the demand window, recency-weighted as the hub weighs them; over
        another horizon (prefetch's hour), plain counts."""
        window = horizon_s == DEMAND_WINDOW_S
        source = self.window if window else self.history
        counts = {}
        for model_id, times in source.items():
            while times and times[0] < now - horizon_s:
                times.popleft()
            if times:
                if window and self.recency_weighted:
                    counts[model_id] = sum(recency_weight(now - t, horizon_s) for t in times)
                else:
                    counts[model_id] = float(len(times))
        return Demand(counts)

    def place(self, model_id: str, now: float) -> bool:
        """Start a load for the model now if the policy finds room; False to wait."""
        raise NotImplementedError

    def tick(self, now: float) -> None:
        pass


class PortenPolicy(Policy):
    name = "porten"
    prefetch = False
    restore = True
    aging_s = AGING_S  # as shipped: the gateway counts a busy-waiting request again every 5 s

    def __init__(self, fleet: Fleet, stats: Stats) -> None:
        super().__init__(fleet, stats)
        self.evicted: dict[str, float] = {}  # model -> when it was evicted for another

    def place(self, model_id: str, now: float) -> bool:
        spec = self.fleet.entries[model_id].spec
        demand = self.demand(now)
        if self.aging_s:
            # Requests waiting for room weigh one more request per `aging_s` waited, so a model
            # refused as busy wins its place in bounded time (anti-starvation).
            waited = sum(now - arrived for arrived in self.waiting.get(model_id, ()))
            demand = Demand(dict(demand.per_model) | {model_id: demand.of(model_id) + waited / self.aging_s})
        result = place(spec, self.fleet.snapshot(now), demand, now_s=now,
                       min_residency_s=MIN_RESIDENCY_S)
        if not isinstance(result, Placement):
            return False
        for victim in result.evict:
            self.fleet.remove(victim.model_id)
            self.stats.evictions += 1
            self.evicted[victim.model_id] = now
        self.evicted.pop(model_id, None)
        self.fleet.start(model_id, int(result.node), result.gpu_indices, now, self.stats)
        return True

    def tick(self, now: float) -> None:
        idle = idle_instances(self.fleet.snapshot(now), self.last_request, now_s=now, window_s=DEMAND_WINDOW_S)
        for _, inst in idle:
            self.fleet.remove(inst.model_id)
            self.stats.idle_unloads += 1
        if self.restore:
            self._restore(now)
        if self.prefetch:
            self._prefetch(now)

    def _restore(self, now: float) -> None:
        """As fleet.placement.instances_restore_evicted: models evicted for room in the last hour
        come back into free memory, most demanded first, three a sweep, never by evicting."""
        for model_id in [m for m, at in self.evicted.items() if now - at > RESTORE_HORIZON_S]:
            del self.evicted[model_id]
        demand = self.demand(now)
        order = sorted(self.evicted, key=lambda m: (-demand.of(m), -self.last_request.get(m, 0.0)))
        for model_id in order[:RESTORE_PER_SWEEP]:
            fit = self.fleet.fit_without_eviction(model_id, now)
            if fit is not None:
                self.fleet.start(model_id, int(fit.node), fit.gpu_indices, now, self.stats)
                self.stats.prefetches += 1
                del self.evicted[model_id]

    def _prefetch(self, now: float) -> None:
        """Load the most requested absent models of the last hour into memory nobody uses."""
        recent = self.demand(now, PREFETCH_HORIZON_S)
        wanted = sorted(
            (m for m in recent.per_model if m not in self.fleet.instances),
            key=lambda m: -recent.of(m),
        )
        for model_id in wanted[:3]:
            fit = self.fleet.fit_without_eviction(model_id, now)
            if fit is not None:
                inst = self.fleet.start(model_id, int(fit.node), fit.gpu_indices, now, self.stats)
                inst.last_used = now
                self.stats.prefetches += 1


class PortenFlatPolicy(PortenPolicy):
    """The policy as first shipped: flat request counts, no restore."""

    name = "porten-flat"
    recency_weighted = False
    restore = False


class PortenStrictPolicy(PortenPolicy):
    """Without aging: a request refused as busy adds no demand while it waits."""

    name = "porten-strict"
    aging_s = 0.0


class PortenPrefetchPolicy(PortenPolicy):
    name = "porten-prefetch"
    prefetch = True


class LruPolicy(Policy):
    """Fit if possible, else evict least recently used ready models just enough."""

    name = "swap-lru"
    ttl_s: float | None = None

    def place(self, model_id: str, now: float) -> bool:
        fit = self.fleet.fit_without_eviction(model_id, now)
        if fit is not None:
            self.fleet.start(model_id, int(fit.node), fit.gpu_indices, now, self.stats)
            return True
        plan = self._lru_plan(model_id, now)
        if plan is None:
            return False
        node, gpus, victims = plan
        for victim in victims:
            self.fleet.remove(victim.model_id)
            self.stats.evictions += 1
        self.fleet.start(model_id, node, gpus, now, self.stats)
        return True

    def _lru_plan(self, model_id: str, now: float) -> tuple[int, tuple[int, ...], list[Instance]] | None:
        vram = self.fleet.entries[model_id].spec.vram_mb
        best = None
        for node_state in self.fleet.snapshot(now):
            node = int(node_state.name)
            on_node = sorted(
                (i for i in self.fleet.instances.values() if i.node == node and i.ready_at <= now),
                key=lambda i: i.last_used,
            )
            for k, per in split_options(node_state, vram)[:1]:
                for gpus in combinations(range(GPUS_PER_NODE), k):
                    free = {g: self.fleet.free_mb(node, g) for g in gpus}
                    victims = []
                    for inst in on_node:
                        if all(f >= per for f in free.values()):
                            break
                        if not any(g in gpus and free[g] < per for g in inst.gpus):
                            continue
                        victims.append(inst)
                        for g in inst.gpus:
                            if g in free:
                                free[g] += -(-inst.vram_mb // len(inst.gpus))
                    if all(f >= per for f in free.values()):
                        key = (max((v.last_used for v in victims), default=0.0), len(victims), node)
                        if best is None or key < best[0]:
                            best = (key, node, gpus, victims)
        return None if best is None else best[1:]

    def tick(self, now: float) -> None:
        if self.ttl_s is None:
            return
        for inst in list(self.fleet.instances.values()):
            if inst.ready_at <= now and now - max(inst.last_used, inst.ready_at) >= self.ttl_s:
                self.fleet.remove(inst.model_id)
                self.stats.idle_unloads += 1


class LruTtlPolicy(LruPolicy):
    name = "lru-ttl"
    ttl_s = LRU_TTL_S


def simulate(
    policy_cls: type[Policy], trace: list[tuple[float, str]], entries: dict[str, CatalogEntry]
) -> Stats:
    stats = Stats()
    fleet = Fleet(entries)
    policy = policy_cls(fleet, stats)
    waiting: dict[str, list[float]] = {}  # model -> arrival times of requests with no instance yet
    policy.waiting = waiting

    def settle(model_id: str, now: float) -> None:
        # A prefetch may have started the model since its requests began to wait.
        if model_id in fleet.instances or policy.place(model_id, now):
            ready = fleet.instances[model_id].ready_at
            for arrived in waiting.pop(model_id):
                account(ready - arrived)

    def account(wait: float) -> None:
        stats.waits.append(wait)
        if wait > 0:
            stats.waited_requests += 1
            stats.wait_s += wait

    ticks = [(t * RETRY_S, "") for t in range(1, int(DAY_S / RETRY_S) + 1)]
    sweep_every = round(SWEEP_S / RETRY_S)
    events = heapq.merge(trace, ticks, key=lambda e: (e[0], e[1] == ""))
    for now, model_id in events:
        if not model_id:
            if round(now / RETRY_S) % sweep_every == 0:
                policy.tick(now)
            for pending in sorted(waiting, key=lambda m: waiting[m][0]):
                settle(pending, now)
            continue
        policy.record(model_id, now)
        inst = fleet.instances.get(model_id)
        if inst is not None:
            inst.last_used = now
            account(max(0.0, inst.ready_at - now))
        elif model_id in waiting:
            waiting[model_id].append(now)
        else:
            waiting[model_id] = [now]
            settle(model_id, now)
    for arrivals in waiting.values():  # never served by the end of the day
        for arrived in arrivals:
            account(DAY_S - arrived)
    return stats


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


POLICIES: tuple[type[Policy], ...] = (
    PortenPolicy, PortenFlatPolicy, PortenStrictPolicy, PortenPrefetchPolicy, LruTtlPolicy, LruPolicy,
)
BASELINES = ("lru-ttl", "swap-lru")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=DAYS,
                        help="days to replay (seeds SEED..SEED+days-1); days vary a lot, more give a steadier figure")
    days = parser.parse_args().days
    entries = catalog()
    total_gb = sum(gb for _, gb in CATALOG_GB)
    print(
        f"catalog {len(entries)} models, {total_gb} GB of footprints; fleet {NODES} nodes x {GPUS_PER_NODE} x "
        f"{GPU_MB // 1024} GB = {NODES * GPUS_PER_NODE * GPU_MB // 1024} GB; {days} simulated days "
        f"(seeds {SEED}..{SEED + days - 1}), every policy replays the same traces"
    )
    totals = {cls.name: Stats() for cls in POLICIES}
    per_day: dict[str, list[float]] = {cls.name: [] for cls in POLICIES}
    requests = 0
    for day in range(days):
        trace = make_trace(list(entries), SEED + day)
        requests += len(trace)
        for cls in POLICIES:
            s = simulate(cls, trace, entries)
            t = totals[cls.name]
            for name in ("loads", "downloads", "waited_requests", "wait_s", "idle_unloads", "evictions",
                         "prefetches"):
                setattr(t, name, getattr(t, name) + getattr(s, name))
            t.waits.extend(s.waits)
            per_day[cls.name].append(s.wait_s)
    print(f"{requests:,} requests in all ({requests / days:,.0f} a day)")
    print()
    header = (
        f"{'policy':<9} {'cold starts':>11} {'downloads':>9} {'reqs waited':>11} {'user-s waited':>13} "
        f"{'p99 wait s':>10} {'evictions':>9} {'idle unloads':>12} {'bg loads':>10}"
    )
    print(header)
    print("-" * len(header))
    for cls in POLICIES:
        s = totals[cls.name]
        print(
            f"{cls.name:<9} {s.loads:>11,} {s.downloads:>9,} {s.waited_requests:>11,} {s.wait_s:>13,.0f} "
            f"{percentile(s.waits, 0.99):>10,.1f} {s.evictions:>9,} {s.idle_unloads:>12,} {s.prefetches:>10,}"
        )
    print()
    print("user-seconds waited per day:")
    for cls in POLICIES:
        print(f"  {cls.name:<9} " + "  ".join(f"{w:>9,.0f}" for w in per_day[cls.name]))
    print()
    best = min(BASELINES, key=lambda n: totals[n].wait_s)
    for name in ("porten", "porten-flat", "porten-strict", "porten-prefetch"):
        reduction = 1 - totals[name].wait_s / totals[best].wait_s
        daily = [
            1 - mine / min(per_day[b][d] for b in BASELINES) for d, mine in enumerate(per_day[name])
        ]
        verdict = "met" if reduction >= TARGET_REDUCTION else "NOT met"
        print(
            f"{name} vs the better baseline ({best}): {reduction:+.1%} user-seconds saved over {days} days "
            f"(per day {min(daily):+.0%} .. {max(daily):+.0%}); target >= {TARGET_REDUCTION:.0%} fewer: {verdict}"
        )


if __name__ == "__main__":
    main()

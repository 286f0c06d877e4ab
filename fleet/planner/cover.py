"""Cheapest minimal set of victims whose eviction frees enough memory on chosen GPUs.

A cover is a set of evictable instances that, once gone, leaves every target GPU with at
least the memory the new model needs there. Only *minimal* covers count: dropping any one
victim must leave some target GPU short, so the planner never evicts more than it needs.

Covers are ranked by `CoverKey`: cost per MB freed (cost = demand x reload seconds; MB freed
counts each victim's whole footprint), then fewer victims, then less memory freed. The search is exhaustive for small candidate lists
and a greedy-then-prune pass above `EXHAUSTIVE_LIMIT`, so one call stays cheap.
"""

from __future__ import annotations

from typing import NamedTuple

from fleet.planner.types import LoadedInstance

# 2**12 subsets is the worst case of the exhaustive search; above it the greedy is used.
EXHAUSTIVE_LIMIT = 12

# (cost per MB freed, number of victims, MB freed)
CoverKey = tuple[float, int, int]


class Candidate(NamedTuple):
    """An instance that may be evicted, with what evicting it costs and frees.

    A named tuple rather than a frozen dataclass: the planner builds thousands per call and
    tuples are several times cheaper to create.
    """

    instance: LoadedInstance
    cost: float  # demand of its model x its reload seconds
    per_gpu_mb: int  # memory it frees on each GPU it spans
    young: bool = False  # loaded less than the minimum residency ago

    @property
    def ratio(self) -> float:
        return self.cost / max(self.instance.vram_mb, 1)


def cover_key(victims: tuple[Candidate, ...] | list[Candidate]) -> CoverKey:
    cost = 0.0
    freed = 0
    for v in victims:
        cost += v.cost
        freed += v.instance.vram_mb
    return (cost / max(freed, 1), len(victims), freed)


def best_single_gpu_cover(
    gpu_index: int, deficit_mb: int, candidates: list[Candidate]
) -> tuple[CoverKey, tuple[Candidate, ...]] | None:
    """Cheapest minimal cover of one GPU that is `deficit_mb` short; None if none exists.

    Every candidate must span `gpu_index`.
    """
    if deficit_mb <= 0:
        return ((0.0, 0, 0), ())
    total = 0
    for c in candidates:
        total += c.per_gpu_mb
    if total < deficit_mb:
        return None
    if len(candidates) > EXHAUSTIVE_LIMIT:
        return greedy_cover({gpu_index: deficit_mb}, candidates)

    # Largest first: a set found feasible the moment its smallest member joins is minimal,
    # because removing any member frees at least as little as removing that last one.
    ordered = sorted(candidates, key=lambda c: -c.per_gpu_mb)
    n = len(ordered)
    sizes = [c.per_gpu_mb for c in ordered]
    suffix = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + sizes[i]

    best: tuple[CoverKey, tuple[Candidate, ...]] | None = None
    chosen: list[Candidate] = []

    def search(start: int, covered: int) -> None:
        nonlocal best
        for i in range(start, n):
            if covered + suffix[i] < deficit_mb:
                return
            chosen.append(ordered[i])
            if covered + sizes[i] >= deficit_mb:
                key = cover_key(chosen)
                if best is None or key < best[0]:
                    best = (key, tuple(chosen))
            else:
                search(i + 1, covered + sizes[i])
            chosen.pop()

    search(0, 0)
    return best


def best_multi_gpu_cover(
    deficits_mb: dict[int, int], candidates: list[Candidate]
) -> tuple[CoverKey, tuple[Candidate, ...]] | None:
    """Cheapest minimal cover of several GPUs at once (a model split across them).

    `deficits_mb` maps GPU index to how short it is; a victim frees `per_gpu_mb` on each
    of its GPUs, so one victim spanning two short GPUs may cover both.
    """
    short = {g: d for g, d in deficits_mb.items() if d > 0}
    if not short:
        return ((0.0, 0, 0), ())
    # A victim that touches no short GPU can never be needed, so it is never a candidate.
    useful = [c for c in candidates if any(g in short for g in c.instance.gpu_indices)]
    for g, d in short.items():
        if sum(c.per_gpu_mb for c in useful if g in c.instance.gpu_indices) < d:
            return None
    if len(useful) > EXHAUSTIVE_LIMIT:
        return greedy_cover(short, useful)

    gpus = sorted(short)
    n = len(useful)
    # freed[i][j]: memory candidate i frees on short GPU gpus[j]
    freed = [
        [c.per_gpu_mb if g in c.instance.gpu_indices else 0 for g in gpus] for c in useful
    ]
    need = [short[g] for g in gpus]
    suffix = [[0] * len(gpus) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        suffix[i] = [a + b for a, b in zip(suffix[i + 1], freed[i])]

    best: tuple[CoverKey, tuple[Candidate, ...]] | None = None
    chosen: list[int] = []

    def is_minimal(covered: list[int]) -> bool:
        for i in chosen:
            if all(covered[j] - freed[i][j] >= need[j] for j in range(len(gpus))):
                return False
        return True

    def search(i: int, covered: list[int]) -> None:
        nonlocal best
        if all(c >= r for c, r in zip(covered, need)):
            # Any superset of a feasible set is not minimal, so this branch ends here.
            if is_minimal(covered):
                key = cover_key([useful[k] for k in chosen])
                if best is None or key < best[0]:
                    best = (key, tuple(useful[k] for k in chosen))
            return
        if i == n:
            return
        if any(c + s < r for c, s, r in zip(covered, suffix[i], need)):
            return
        # Taking a victim that frees nothing on a still-short GPU can't make a minimal set.
        if any(freed[i][j] and covered[j] < need[j] for j in range(len(gpus))):
            chosen.append(i)
            search(i + 1, [c + f for c, f in zip(covered, freed[i])])
            chosen.pop()
        search(i + 1, covered)

    search(0, [0] * len(gpus))
    return best


def greedy_cover(
    deficits_mb: dict[int, int], candidates: list[Candidate]
) -> tuple[CoverKey, tuple[Candidate, ...]] | None:
    """Cheapest-per-MB first until every short GPU is covered, then prune to a minimal set."""
    remaining = {g: d for g, d in deficits_mb.items() if d > 0}
    chosen: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.ratio, -c.instance.vram_mb)):
        if not remaining:
            break
        hits = [g for g in c.instance.gpu_indices if g in remaining]
        if not hits:
            continue
        chosen.append(c)
        for g in hits:
            remaining[g] -= c.per_gpu_mb
            if remaining[g] <= 0:
                del remaining[g]
    if remaining:
        return None
    victims = prune_to_minimal(deficits_mb, chosen)
    return (cover_key(victims), victims)


def prune_to_minimal(
    deficits_mb: dict[int, int], victims: list[Candidate] | tuple[Candidate, ...]
) -> tuple[Candidate, ...]:
    """Give back victims, most expensive first, while every GPU stays covered.

    A victim kept once stays needed because the set only shrinks afterwards, so one pass
    leaves a minimal set.
    """
    slack = {g: -d for g, d in deficits_mb.items()}
    for v in victims:
        for g in v.instance.gpu_indices:
            if g in slack:
                slack[g] += v.per_gpu_mb
    kept = []
    for v in sorted(victims, key=lambda c: (-c.cost, c.instance.vram_mb)):
        if all(slack[g] - v.per_gpu_mb >= 0 for g in v.instance.gpu_indices if g in slack):
            for g in v.instance.gpu_indices:
                if g in slack:
                    slack[g] -= v.per_gpu_mb
        else:
            kept.append(v)
    kept.sort(key=lambda c: c.instance.instance_id)
    return tuple(kept)

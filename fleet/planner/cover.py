"""Cheapest minimal set of victims whose eviction frees enough memory on chosen GPUs.

A cover is a set of evictable instances that, once gone, leaves every target GPU with at
least the memory the new model needs there. Only *minimal* covers count: dropping any one
victim must leave some target GPU short, so the planner never evicts more than it needs.

Covers are ranked by `CoverKey`: cost per MB freed (cost = demand x reload seconds), then
fewer victims, then less memory freed. The search is exhaustive for small candidate lists
and a greedy-then-prune pass above `EXHAUSTIVE_LIMIT`, so one call stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.planner.types import LoadedInstance

# 2**12 subsets is the worst case of the exhaustive search; above it the greedy is used.
EXHAUSTIVE_LIMIT = 12

# (cost per MB freed, number of victims, MB freed)
CoverKey = tuple[float, int, int]


@dataclass(frozen=True, slots=True)
class Candidate:
    """An instance that may be evicted, with what evicting it costs and frees."""

    instance: LoadedInstance
    cost: float  # demand of its model x its reload seconds
    per_gpu_mb: int  # memory it frees on each GPU it spans

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
    deficit_mb: int, candidates: list[Candidate]
) -> tuple[CoverKey, tuple[Candidate, ...]] | None:
    """Cheapest minimal cover of one GPU that is `deficit_mb` short; None if none exists."""
    if deficit_mb <= 0:
        return ((0.0, 0, 0), ())
    total = 0
    for c in candidates:
        total += c.per_gpu_mb
    if total < deficit_mb:
        return None
    if len(candidates) > EXHAUSTIVE_LIMIT:
        return _greedy_cover({-1: deficit_mb}, candidates, lambda c, g: c.per_gpu_mb)

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
        return _greedy_cover(
            short, useful, lambda c, g: c.per_gpu_mb if g in c.instance.gpu_indices else 0
        )

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


def _greedy_cover(
    deficits_mb: dict[int, int],
    candidates: list[Candidate],
    frees_on,
) -> tuple[CoverKey, tuple[Candidate, ...]] | None:
    """Cheapest-per-MB first until every GPU is covered, then drop what turned out unneeded.

    The pruning pass visits victims most expensive first, so the costly ones are the ones
    given back; a victim kept once stays needed as the set only shrinks, so the result is
    minimal.
    """
    remaining = dict(deficits_mb)
    chosen: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.ratio, -c.instance.vram_mb)):
        if all(r <= 0 for r in remaining.values()):
            break
        if not any(frees_on(c, g) and r > 0 for g, r in remaining.items()):
            continue
        chosen.append(c)
        for g in remaining:
            remaining[g] -= frees_on(c, g)
    if any(r > 0 for r in remaining.values()):
        return None
    for c in sorted(chosen, key=lambda c: (-c.cost, c.instance.vram_mb)):
        if all(r + frees_on(c, g) <= 0 for g, r in remaining.items()):
            chosen.remove(c)
            for g in remaining:
                remaining[g] += frees_on(c, g)
    victims = tuple(chosen)
    return (cover_key(victims), victims)

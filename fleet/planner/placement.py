"""Where to load a model next, and what to evict for it: a pure function of the fleet's state.

Memory accounting, shared with the tests:
- a model split across k GPUs needs ceil(vram_mb / k) on each of them;
- evicting an instance frees floor(vram_mb / len(gpu_indices)) on each of its GPUs.
Rounding both ways against us means a placement never overcommits a GPU by a megabyte.

A model is split only when it is larger than every GPU of a node, over the smallest number
of that node's GPUs that can hold it (more GPUs only when fewer have no room).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from math import comb

from fleet.planner.cover import (
    Candidate,
    CoverKey,
    best_multi_gpu_cover,
    best_single_gpu_cover,
)
from fleet.planner.types import (
    BUSY,
    NO_CAPACITY,
    Demand,
    LoadedInstance,
    ModelSpec,
    NodeState,
    NoPlacement,
    Placement,
)

# A node with more GPUs than this many ways to pick k of them is searched over the GPUs
# closest to fitting only, so one request never walks thousands of combinations.
MAX_GPU_COMBINATIONS = 70

# (cover key..., 1 when weights must be downloaded, order of the node in the input)
_PlanKey = tuple[float, int, int, int, int]


def share_mb(vram_mb: int, k: int) -> int:
    """Memory a model needs on each of k GPUs it is split across."""
    return -(-vram_mb // k)


def freed_per_gpu_mb(instance: LoadedInstance) -> int:
    """Memory evicting an instance gives back on each GPU it spans."""
    return instance.vram_mb // max(len(instance.gpu_indices), 1)


def split_options(node: NodeState, vram_mb: int) -> list[tuple[int, int]]:
    """(k, MB per GPU) ways this node could ever hold the model, empty, fewest GPUs first."""
    if not node.gpus:
        return []
    if vram_mb <= max(g.total_mb for g in node.gpus):
        return [(1, vram_mb)]
    options = []
    for k in range(2, len(node.gpus) + 1):
        per = share_mb(vram_mb, k)
        if sum(1 for g in node.gpus if g.total_mb >= per) >= k:
            options.append((k, per))
    return options


def place(
    model: ModelSpec,
    nodes: Sequence[NodeState],
    demand: Demand,
    *,
    now_s: float,
    min_residency_s: float = 120.0,
) -> Placement | NoPlacement:
    """Pick a node and GPUs for `model`, evicting lower-demand models only if nothing fits."""
    vram = model.vram_mb
    online = [n for n in nodes if n.online]
    options_by_node = [(order, n, split_options(n, vram)) for order, n in enumerate(online)]
    possible = [(order, n, opts) for order, n, opts in options_by_node if opts]
    if not possible:
        return NoPlacement(NO_CAPACITY, _no_capacity_reason(model, online))

    fit = _best_fit_without_eviction(model, possible)
    if fit is not None:
        return fit

    wanted = demand.of(model.model_id)
    if wanted <= 0:
        # Demand counts are never negative, so no victim has strictly lower demand.
        return NoPlacement(BUSY, _busy_reason(model, wanted))
    # Cheapest first guess of what each node's best cover could be: lets the search stop
    # early once a cover beats every node still to visit.
    ranked = sorted(
        ((_deficit_bound(node, opts), model.model_id not in node.models_on_disk, order, node, opts)
         for order, node, opts in possible),
        key=lambda t: (t[0], t[1], t[2]),
    )
    for allow_young in (False, True):
        found, saw_young = _best_eviction(
            model, ranked, demand, wanted, now_s, min_residency_s, allow_young
        )
        if found is not None:
            return found
        if not saw_young:
            break
    return NoPlacement(BUSY, _busy_reason(model, wanted))


def idle_instances(
    nodes: Sequence[NodeState],
    last_request_s: Mapping[str, float],
    *,
    now_s: float,
    window_s: float,
) -> list[tuple[str, LoadedInstance]]:
    """(node name, instance) for unpinned evictable instances idle for `window_s`, idlest first.

    Idle time counts from the later of the model's last request and the instance's
    `loaded_at_s`: a load slower than the window must not be unloaded the moment it is ready.
    Offline nodes are left out; nothing can be drained there.
    """
    idle: list[tuple[float, str, LoadedInstance]] = []
    for node in nodes:
        if not node.online:
            continue
        for inst in node.instances:
            if inst.pinned or not inst.evictable:
                continue
            since = max(last_request_s.get(inst.model_id, inst.loaded_at_s), inst.loaded_at_s)
            if now_s - since >= window_s:
                idle.append((now_s - since, node.name, inst))
    idle.sort(key=lambda t: (-t[0], t[1], t[2].instance_id))
    return [(name, inst) for _, name, inst in idle]


def _best_fit_without_eviction(
    model: ModelSpec, possible: list[tuple[int, NodeState, list[tuple[int, int]]]]
) -> Placement | None:
    """Weights on disk first, then the tightest fit (least memory left over on the GPUs)."""
    best: tuple[tuple[int, int, int], NodeState, tuple[int, ...], int] | None = None
    for order, node, opts in possible:
        download = 0 if model.model_id in node.models_on_disk else 1
        if best is not None and download > best[0][0]:
            continue
        for k, per in opts:
            roomy = [g for g in node.gpus if g.total_mb >= per and g.free_mb >= per]
            if len(roomy) < k:
                continue
            roomy.sort(key=lambda g: (g.free_mb, g.index))
            chosen = roomy[:k]
            key = (download, sum(g.free_mb - per for g in chosen), order)
            if best is None or key < best[0]:
                best = (key, node, tuple(sorted(g.index for g in chosen)), per)
            break  # the fewest GPUs that fit on this node
    if best is None:
        return None
    key, node, gpu_indices, per = best
    leftover = key[1]
    reason = (
        f"node {node.name} {_gpus_text(gpu_indices)}: fits with {leftover:,} MB left over"
        f"{_split_text(gpu_indices, per)}; {_disk_text(model, node)}"
    )
    return Placement(node=node.name, gpu_indices=gpu_indices, evict=(), reason=reason)


def _deficit_bound(node: NodeState, opts: list[tuple[int, int]]) -> int:
    """Least memory any cover on this node must free: a lower bound used to stop early."""
    bound = None
    for k, per in opts:
        deficits = sorted(max(per - g.free_mb, 0) for g in node.gpus if g.total_mb >= per)
        total = sum(deficits[:k])
        bound = total if bound is None else min(bound, total)
    return bound or 0


def _candidates(
    node: NodeState,
    demand_of: Callable[[str, float], float],
    wanted: float,
    now_s: float,
    min_residency_s: float,
    allow_young: bool,
) -> tuple[list[Candidate], bool]:
    """Instances on this node the rules allow to evict, and whether young ones were skipped."""
    out: list[Candidate] = []
    saw_young = False
    for inst in node.instances:
        if inst.pinned or not inst.evictable:
            continue
        d = demand_of(inst.model_id, 0.0)
        if d >= wanted:
            continue
        if now_s - inst.loaded_at_s < min_residency_s:
            saw_young = True
            if not allow_young:
                continue
        per = freed_per_gpu_mb(inst)
        if per > 0:
            out.append(Candidate(inst, d * inst.reload_s, per))
    return out, saw_young


def _best_eviction(
    model: ModelSpec,
    ranked: list[tuple[int, bool, int, NodeState, list[tuple[int, int]]]],
    demand: Demand,
    wanted: float,
    now_s: float,
    min_residency_s: float,
    allow_young: bool,
) -> tuple[Placement | None, bool]:
    demand_of = demand.per_model.get
    best_key: _PlanKey | None = None
    best_plan: tuple[NodeState, tuple[int, ...], int, tuple[Candidate, ...]] | None = None
    saw_young_any = False
    for bound, download, order, node, opts in ranked:
        if best_key is not None and (0.0, 1, bound, int(download), order) >= best_key:
            break  # ranked by bound: no later node can beat the cover in hand
        cands, saw_young = _candidates(
            node, demand_of, wanted, now_s, min_residency_s, allow_young
        )
        saw_young_any = saw_young_any or saw_young
        if not cands:
            continue
        tail = (int(download), order)
        found = _best_on_node(node, opts, cands, best_key, tail)
        if found is not None and (best_key is None or found[0] < best_key):
            best_key = found[0]
            best_plan = (node, found[1], found[2], found[3])
    if best_plan is None:
        return None, saw_young_any
    node, gpu_indices, per, victims = best_plan
    return _eviction_placement(model, node, gpu_indices, per, victims, demand, wanted,
                               now_s, min_residency_s), saw_young_any


def _best_on_node(
    node: NodeState,
    opts: list[tuple[int, int]],
    cands: list[Candidate],
    best_key: _PlanKey | None,
    tail: tuple[int, int],
) -> tuple[_PlanKey, tuple[int, ...], int, tuple[Candidate, ...]] | None:
    """Best cover on one node at its fewest GPUs that work, if it beats `best_key`."""
    for k, per in opts:
        if k == 1:
            found = _best_single(node, per, cands, best_key, tail)
        else:
            found = _best_multi(node, k, per, cands, best_key, tail)
        if found == "beaten":
            return None  # k GPUs work here, just not better than the cover in hand
        if found is not None:
            return found
    return None


def _best_single(node, per, cands, best_key, tail):
    by_gpu: dict[int, list[Candidate]] = {}
    for c in cands:
        for g in c.instance.gpu_indices:
            by_gpu.setdefault(g, []).append(c)
    best = None
    feasible = False
    for gpu in node.gpus:
        if gpu.total_mb < per:
            continue
        on_gpu = by_gpu.get(gpu.index)
        if not on_gpu:
            continue
        deficit = per - gpu.free_mb
        if sum(c.per_gpu_mb for c in on_gpu) < deficit:
            continue
        feasible = True
        bound = (min(c.ratio for c in on_gpu), 1, deficit) + tail
        limit = best[0] if best is not None else best_key  # a local best already beats best_key
        if limit is not None and bound >= limit:
            continue
        cover = best_single_gpu_cover(deficit, on_gpu)
        if cover is None:
            continue
        key = cover[0] + tail
        if limit is None or key < limit:
            best = (key, (gpu.index,), per, cover[1])
    if best is None and feasible:
        return "beaten"
    return best


def _best_multi(node, k, per, cands, best_key, tail):
    eligible = [g for g in node.gpus if g.total_mb >= per]
    if comb(len(eligible), k) > MAX_GPU_COMBINATIONS:
        eligible.sort(key=lambda g: (per - g.free_mb, g.index))
        m = k
        while m < len(eligible) and comb(m + 1, k) <= MAX_GPU_COMBINATIONS:
            m += 1
        eligible = eligible[:m]
    best = None
    feasible = False
    for group in combinations(eligible, k):
        deficits = {g.index: per - g.free_mb for g in group}
        bound = (0.0, 1, sum(d for d in deficits.values() if d > 0)) + tail
        limit = best[0] if best is not None else best_key  # a local best already beats best_key
        if limit is not None and bound >= limit:
            # Still need to know whether this k works here at all (fewest GPUs first).
            if not feasible and _can_cover(deficits, cands):
                feasible = True
            continue
        cover = best_multi_gpu_cover(deficits, cands)
        if cover is None:
            continue
        feasible = True
        key = cover[0] + tail
        if limit is None or key < limit:
            best = (key, tuple(sorted(deficits)), per, cover[1])
    if best is None and feasible:
        return "beaten"
    return best


def _can_cover(deficits: dict[int, int], cands: list[Candidate]) -> bool:
    for g, d in deficits.items():
        if d > 0 and sum(c.per_gpu_mb for c in cands if g in c.instance.gpu_indices) < d:
            return False
    return True


def _eviction_placement(
    model: ModelSpec,
    node: NodeState,
    gpu_indices: tuple[int, ...],
    per: int,
    victims: tuple[Candidate, ...],
    demand: Demand,
    wanted: float,
    now_s: float,
    min_residency_s: float,
) -> Placement:
    free_after = min(
        g.free_mb + sum(v.per_gpu_mb for v in victims if g.index in v.instance.gpu_indices)
        for g in node.gpus
        if g.index in gpu_indices
    )
    named = ", ".join(v.instance.model_id for v in victims)
    top = max(demand.of(v.instance.model_id) for v in victims)
    young = any(now_s - v.instance.loaded_at_s < min_residency_s for v in victims)
    reason = (
        f"node {node.name} {_gpus_text(gpu_indices)}: {free_after:,} MB free after evicting "
        f"{named} (demand {top:g} < {wanted:g}){_split_text(gpu_indices, per)}; "
        f"{_disk_text(model, node)}"
    )
    if young:
        reason += f"; evicts a model loaded under {min_residency_s:g} s ago, no other room"
    return Placement(
        node=node.name,
        gpu_indices=gpu_indices,
        evict=tuple(v.instance for v in victims),
        reason=reason,
    )


def _gpus_text(gpu_indices: tuple[int, ...]) -> str:
    if len(gpu_indices) == 1:
        return f"gpu {gpu_indices[0]}"
    return "gpus " + ",".join(str(i) for i in gpu_indices)


def _split_text(gpu_indices: tuple[int, ...], per: int) -> str:
    return "" if len(gpu_indices) == 1 else f", {per:,} MB on each of {len(gpu_indices)} GPUs"


def _disk_text(model: ModelSpec, node: NodeState) -> str:
    if model.model_id in node.models_on_disk:
        return "weights on disk"
    return f"weights to download (~{model.download_s:g} s)"


def _no_capacity_reason(model: ModelSpec, online: list[NodeState]) -> str:
    if not online:
        return f"{model.model_id} needs {model.vram_mb:,} MB; no node is online"
    largest = max(online, key=lambda n: sum(g.total_mb for g in n.gpus))
    total = sum(g.total_mb for g in largest.gpus)
    biggest_gpu = max((g.total_mb for g in largest.gpus), default=0)
    return (
        f"{model.model_id} needs {model.vram_mb:,} MB; the largest node has {total:,} MB"
        f" ({len(largest.gpus)} x up to {biggest_gpu:,} MB)"
    )


def _busy_reason(model: ModelSpec, wanted: float) -> str:
    return (
        f"{model.model_id} needs {model.vram_mb:,} MB; no node can make room without evicting "
        f"pinned, loading or busier models (demand {wanted:g})"
    )

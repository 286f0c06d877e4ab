"""Where to load a model next, and what to evict for it: a pure function of the fleet's state.

Memory accounting, shared with the tests:
- a model split across k GPUs needs ceil(vram_mb / k) on each of them;
- evicting an instance frees floor(vram_mb / len(gpu_indices)) on each of its GPUs.
Rounding both ways against us means a placement never overcommits a GPU by a megabyte.

A model is split only when it is larger than every GPU of a node, over the fewest of that
node's GPUs that can hold it (more GPUs only when fewer have no room).

Search effort is bounded so one call stays in the low milliseconds on a thousand nodes:
- nodes are visited closest-to-fitting first, and the search stops once no node left can
  beat the plan in hand, or `max_nodes_compared` nodes have been compared after the first
  that can make room (a best-of-shortlist on huge fleets, exact on small ones);
- victim sets are searched exhaustively up to `cover.EXHAUSTIVE_LIMIT` candidates per GPU,
  greedily above;
- split models try every group of k GPUs when there are few groups, else the k GPUs whose
  own covers are cheapest.
Legality never depends on these limits: never over capacity, never pinned or
loading/draining victims, only strictly lower demand (and lower demand x reload time than the
requested model's demand x load time), always a minimal victim set, and
"busy" only when no node at all can make room under the rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from math import comb

from fleet.planner.cover import (
    Candidate,
    best_multi_gpu_cover,
    best_single_gpu_cover,
    cover_key,
    prune_to_minimal,
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

MAX_NODES_COMPARED = 8
# Up to this many groups of k GPUs on a node are each searched for a cover; above it only
# the k GPUs whose own covers are cheapest.
EXACT_GPU_GROUPS = 10

# (cost per MB freed, victims, MB freed, 1 when weights must be downloaded, node order)
_PlanKey = tuple[float, int, int, int, int]
# (node, gpu indices, MB per GPU, victims)
_Plan = tuple[NodeState, tuple[int, ...], int, tuple[Candidate, ...]]
# the best cover found on one node: (its key, gpu indices, MB per GPU, victims)
_NodeBest = tuple[_PlanKey, tuple[int, ...], int, tuple[Candidate, ...]]
# (least MB any cover must free, needs download, node order, node, split options or None
# when not yet worked out)
_Shortfall = tuple[int, bool, int, NodeState, list[tuple[int, int]] | None]


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
    if any(g.total_mb >= vram_mb for g in node.gpus):
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
    max_nodes_compared: int = MAX_NODES_COMPARED,
) -> Placement | NoPlacement:
    """Pick a node and GPUs for `model`, evicting lower-demand models only if nothing fits."""
    vram = model.vram_mb
    model_id = model.model_id
    online = [n for n in nodes if n.online]

    # One pass over every GPU: the best fit without eviction, and for the nodes without
    # room how far each is from fitting, which orders the eviction search.
    fit_key: tuple[bool, int, int] | None = None
    fit: tuple[NodeState, tuple[int, ...], int] | None = None
    shortfalls: list[_Shortfall] = []
    layouts = _Layouts(vram)
    single = [(1, vram)]
    for order, node in enumerate(online):
        download = model_id not in node.models_on_disk
        if fit_key is not None and download > fit_key[0]:
            continue  # weights on disk somewhere with room beats any download
        tightest = None
        least_short = None
        free_sum = 0
        for g in node.gpus:
            free = g.free_mb
            free_sum += free
            if g.total_mb >= vram:
                if free >= vram:
                    if tightest is None or free < tightest.free_mb:
                        tightest = g
                elif least_short is None or vram - free < least_short:
                    least_short = vram - free
        if tightest is not None:
            key = (download, tightest.free_mb - vram, order)
            if fit_key is None or key < fit_key:
                fit_key, fit = key, (node, (tightest.index,), vram)
        elif least_short is not None:
            shortfalls.append((least_short, download, order, node, single))
        elif free_sum < vram:
            # Split or not, k GPUs given ceil(vram / k) each hold at least vram, more than
            # the node has free: no fit here, and any cover frees at least the difference.
            # Whether the node could ever hold the model is settled only if it is needed.
            shortfalls.append((vram - free_sum, download, order, node, None))
        else:
            options, uniform = layouts.of(node)
            if not options:
                continue
            found = _uniform_split(node, options) if uniform else _fewest_gpus_fitting(node, options)
            if isinstance(found, tuple):
                gpu_indices, per, leftover = found
                key = (download, leftover, order)
                if fit_key is None or key < fit_key:
                    fit_key, fit = key, (node, gpu_indices, per)
            else:
                bound = found if found is not None else _least_to_free(node, options)
                shortfalls.append((bound, download, order, node, options))

    if fit is not None:
        return _fit_placement(model, *fit)

    wanted = demand.of(model_id)
    # Demand counts are never negative, so at zero no victim has strictly lower demand.
    if wanted > 0:
        shortfalls.sort(key=lambda s: (s[0], s[1], s[2]))
        candidates_by_node: dict[int, list[Candidate]] = {}
        for allow_young in (False, True):
            plan, saw_young = _best_eviction(
                shortfalls,
                layouts,
                candidates_by_node,
                demand.per_model,
                wanted,
                wanted * model.load_s,
                now_s,
                min_residency_s,
                allow_young,
                max_nodes_compared,
            )
            if plan is not None:
                return _eviction_placement(model, plan, demand, wanted, min_residency_s)
            if not saw_young:
                break
    if not any(s[4] or layouts.of(s[3])[0] for s in shortfalls):
        return NoPlacement(NO_CAPACITY, _no_capacity_reason(model, online))
    return NoPlacement(BUSY, _busy_reason(model, wanted))


def place_replica(
    model: ModelSpec,
    nodes: Sequence[NodeState],
    demand: Demand,
    *,
    now_s: float,
    min_residency_s: float = 120.0,
    max_nodes_compared: int = MAX_NODES_COMPARED,
) -> Placement | NoPlacement:
    """One more replica of `model`, by `place`'s rules, on a node that holds none of it yet (so
    replicas never share a node, and one never evicts another)."""
    others = [n for n in nodes if all(i.model_id != model.model_id for i in n.instances)]
    if not any(n.online for n in others):
        return NoPlacement(BUSY, f"every online node already serves {model.model_id}")
    return place(model, others, demand, now_s=now_s, min_residency_s=min_residency_s,
                 max_nodes_compared=max_nodes_compared)


def idle_instances(
    nodes: Sequence[NodeState],
    last_request_s: Mapping[str, float],
    *,
    now_s: float,
    window_s: float,
    window_s_for: Mapping[str, float] | None = None,
) -> list[tuple[str, LoadedInstance]]:
    """(node name, instance) for unpinned evictable instances idle for `window_s` (or the model's
    own window in `window_s_for`), idlest first.

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
            if now_s - since >= (window_s_for or {}).get(inst.model_id, window_s):
                idle.append((now_s - since, node.name, inst))
    idle.sort(key=lambda t: (-t[0], t[1], t[2].instance_id))
    return [(name, inst) for _, name, inst in idle]


class _Layouts:
    """Split options per GPU layout, worked out once per call: fleets repeat a few layouts."""

    def __init__(self, vram_mb: int) -> None:
        self.vram_mb = vram_mb
        self.seen: dict[tuple[int, ...], tuple[list[tuple[int, int]], bool]] = {}

    def of(self, node: NodeState) -> tuple[list[tuple[int, int]], bool]:
        """(options, uniform): uniform when every GPU takes every share (identical GPUs)."""
        totals = tuple(g.total_mb for g in node.gpus)
        layout = self.seen.get(totals)
        if layout is None:
            options = split_options(node, self.vram_mb)
            uniform = bool(options) and min(totals) >= options[0][1]
            layout = self.seen[totals] = (options, uniform)
        return layout


def _fewest_gpus_fitting(
    node: NodeState, options: list[tuple[int, int]]
) -> tuple[tuple[int, ...], int, int] | None:
    """(GPUs, MB per GPU, MB left over) at the fewest GPUs with room now, tightest GPUs."""
    for k, per in options:
        roomy = sorted(
            (g for g in node.gpus if g.total_mb >= per and g.free_mb >= per),
            key=lambda g: (g.free_mb, g.index),
        )
        if len(roomy) >= k:
            chosen = roomy[:k]
            leftover = sum(g.free_mb - per for g in chosen)
            return tuple(sorted(g.index for g in chosen)), per, leftover
    return None


def _uniform_split(
    node: NodeState, options: list[tuple[int, int]]
) -> tuple[tuple[int, ...], int, int] | int:
    """Fewest-GPU fit on a node whose GPUs all take every share, else a bound on what to free.

    Works on the sorted free memory alone, so a thousand nodes cost a few sorts of 8 numbers.
    """
    frees = sorted((g.free_mb for g in node.gpus), reverse=True)
    bound = None
    for k, per in options:
        if frees[k - 1] >= per:
            roomy = sum(1 for f in frees if f >= per)
            leftover = sum(frees[roomy - k : roomy]) - k * per
            chosen = sorted(
                (g for g in node.gpus if g.free_mb >= per), key=lambda g: (g.free_mb, g.index)
            )[:k]
            return tuple(sorted(g.index for g in chosen)), per, leftover
        # The k GPUs with most room, each short by at least per - free.
        least = max(k * per - sum(frees[:k]), per - frees[k - 1])
        bound = least if bound is None else min(bound, least)
    return bound if bound is not None else 0


def _least_to_free(node: NodeState, options: list[tuple[int, int]]) -> int:
    """Least memory any cover on this node must free: a lower bound to stop the search early."""
    bound = None
    for k, per in options:
        deficits = sorted(max(per - g.free_mb, 0) for g in node.gpus if g.total_mb >= per)
        total = sum(deficits[:k])
        bound = total if bound is None else min(bound, total)
    return bound or 0


def _node_candidates(
    node: NodeState,
    demand_per_model: Mapping[str, float],
    wanted: float,
    wanted_cost: float,
    now_s: float,
    min_residency_s: float,
) -> list[Candidate]:
    """Instances on this node the rules allow to evict, young ones flagged.

    A victim must have less demand than the requested model, and its users must stand to lose
    less waiting than the requested model's users are losing: demand x reload seconds below the
    requested model's demand x load seconds: otherwise a model that takes 80 s to load is evicted
    for one that takes 10 s whenever the small one is asked for slightly more, and both sets of
    users wait (bench/simulate.py; docs/performance.md).
    """
    get = demand_per_model.get
    out: list[Candidate] = []
    for inst in node.instances:
        # Demand first: on a busy fleet it rejects most instances, and this loop is the
        # one that touches every instance when no node can make room.
        d = get(inst.model_id, 0.0)
        if d >= wanted or inst.pinned or not inst.evictable:
            continue
        if d * inst.reload_s >= wanted_cost:
            continue
        per = inst.vram_mb // max(len(inst.gpu_indices), 1)
        if per > 0:
            young = now_s - inst.loaded_at_s < min_residency_s
            out.append(Candidate(inst, d * inst.reload_s, per, young))
    return out


def _best_eviction(
    shortfalls: list[_Shortfall],
    layouts: _Layouts,
    candidates_by_node: dict[int, list[Candidate]],
    demand_per_model: Mapping[str, float],
    wanted: float,
    wanted_cost: float,
    now_s: float,
    min_residency_s: float,
    allow_young: bool,
    max_nodes_compared: int,
) -> tuple[_Plan | None, bool]:
    """Best plan over the nodes, and whether any young candidate was left out."""
    best_key: _PlanKey | None = None
    best_plan: _Plan | None = None
    saw_young = False
    compared = 0
    for least, download, order, node, options in shortfalls:
        if best_key is not None:
            if (0.0, 1, least, int(download), order) >= best_key:
                break  # sorted by this bound: no later node can beat the plan in hand
            if compared >= max_nodes_compared:
                break
            compared += 1
        if options is None:
            options = layouts.of(node)[0]
            if not options:
                continue
        cands = candidates_by_node.get(order)
        if cands is None:
            cands = _node_candidates(node, demand_per_model, wanted, wanted_cost, now_s, min_residency_s)
            candidates_by_node[order] = cands
        if not allow_young and cands:
            mature = [c for c in cands if not c.young]
            saw_young = saw_young or len(mature) < len(cands)
            cands = mature
        if not cands:
            continue
        tail = (int(download), order)
        found = _best_on_node(node, options, cands, best_key, tail, least)
        if found is not None:
            best_key, best_plan = found[0], (node, found[1], found[2], found[3])
    return best_plan, saw_young


def _best_on_node(
    node: NodeState,
    options: list[tuple[int, int]],
    cands: list[Candidate],
    best_key: _PlanKey | None,
    tail: tuple[int, int],
    least_mb: int,
) -> _NodeBest | None:
    """Best cover at this node's fewest GPUs that can make room, if it beats `best_key`."""
    if best_key is not None:
        # Cheap bound before any search: a set costs at least its cheapest member per MB,
        # and each short GPU of the group needs a victim of its own unless victims span GPUs.
        fewest = 1
        if len(options) == 1:
            k, per = options[0]
            roomy = sum(1 for g in node.gpus if g.free_mb >= per)
            widest = max(len(c.instance.gpu_indices) for c in cands)
            fewest = max(1, -(-(k - roomy) // widest))
        if (min(c.ratio for c in cands), fewest, least_mb) + tail >= best_key:
            return None
    for k, per in options:
        if k == 1:
            found, feasible = _best_single(node, per, cands, best_key, tail)
        elif comb(sum(1 for g in node.gpus if g.total_mb >= per), k) <= EXACT_GPU_GROUPS:
            found, feasible = _best_split_exact(node, k, per, cands, best_key, tail)
        else:
            found, feasible = _best_split_greedy(node, k, per, cands, best_key, tail)
        if feasible:
            return found  # fewest GPUs first, even when a larger k would be cheaper
    return None


def _best_single(
    node: NodeState,
    per: int,
    cands: list[Candidate],
    best_key: _PlanKey | None,
    tail: tuple[int, int],
) -> tuple[_NodeBest | None, bool]:
    """Best single-GPU cover on the node beating `best_key`, and whether any GPU can make room."""
    by_gpu: dict[int, list[Candidate]] = {}
    for c in cands:
        for g in c.instance.gpu_indices:
            if g in by_gpu:
                by_gpu[g].append(c)
            else:
                by_gpu[g] = [c]
    best = None
    feasible = False
    for gpu in node.gpus:
        on_gpu = by_gpu.get(gpu.index)
        if not on_gpu or gpu.total_mb < per:
            continue
        deficit = per - gpu.free_mb
        if sum(c.per_gpu_mb for c in on_gpu) < deficit:
            continue
        feasible = True
        limit = best[0] if best is not None else best_key  # a local best already beats best_key
        if limit is not None and (min(c.ratio for c in on_gpu), 1, deficit) + tail >= limit:
            continue
        cover = best_single_gpu_cover(gpu.index, deficit, on_gpu)
        if cover is not None:
            key = cover[0] + tail
            if limit is None or key < limit:
                best = (key, (gpu.index,), per, cover[1])
    return best, feasible


def _best_split_exact(
    node: NodeState,
    k: int,
    per: int,
    cands: list[Candidate],
    best_key: _PlanKey | None,
    tail: tuple[int, int],
) -> tuple[_NodeBest | None, bool]:
    """Every group of k GPUs, each searched for its cheapest cover."""
    best = None
    feasible = False
    for group in combinations([g for g in node.gpus if g.total_mb >= per], k):
        deficits = {g.index: per - g.free_mb for g in group}
        if not _can_cover(deficits, cands):
            continue
        feasible = True
        limit = best[0] if best is not None else best_key
        if limit is not None and (0.0, 1, sum(d for d in deficits.values() if d > 0)) + tail >= limit:
            continue
        cover = best_multi_gpu_cover(deficits, cands)
        if cover is not None:
            key = cover[0] + tail
            if limit is None or key < limit:
                best = (key, tuple(sorted(deficits)), per, cover[1])
    return best, feasible


def _best_split_greedy(
    node: NodeState,
    k: int,
    per: int,
    cands: list[Candidate],
    best_key: _PlanKey | None,
    tail: tuple[int, int],
) -> tuple[_NodeBest | None, bool]:
    """Many GPUs: take the k whose own cheapest covers are cheapest, then prune the union.

    A GPU can host its share iff all candidates on it together free enough, independently
    of the others, so this finds a plan whenever any group of k GPUs could make room.
    """
    ranked = []
    for gpu in node.gpus:
        if gpu.total_mb < per:
            continue
        deficit = per - gpu.free_mb
        if deficit <= 0:
            ranked.append(((0.0, 0, 0), gpu.index, ()))
            continue
        on_gpu = [c for c in cands if gpu.index in c.instance.gpu_indices]
        cover = best_single_gpu_cover(gpu.index, deficit, on_gpu)
        if cover is not None:
            ranked.append((cover[0], gpu.index, cover[1]))
    if len(ranked) < k:
        return None, False
    ranked.sort(key=lambda r: (r[0], r[1]))
    chosen = ranked[:k]
    deficits = {g.index: per - g.free_mb for g in node.gpus if g.index in {r[1] for r in chosen}}
    union = {c.instance.instance_id: c for r in chosen for c in r[2]}
    victims = prune_to_minimal(deficits, list(union.values()))
    key = cover_key(victims) + tail
    if best_key is not None and key >= best_key:
        return None, True
    return (key, tuple(sorted(deficits)), per, victims), True


def _can_cover(deficits: dict[int, int], cands: list[Candidate]) -> bool:
    for g, d in deficits.items():
        if d > 0 and sum(c.per_gpu_mb for c in cands if g in c.instance.gpu_indices) < d:
            return False
    return True


def _fit_placement(
    model: ModelSpec, node: NodeState, gpu_indices: tuple[int, ...], per: int
) -> Placement:
    leftover = sum(g.free_mb - per for g in node.gpus if g.index in gpu_indices)
    reason = (
        f"node {node.name} {_gpus_text(gpu_indices)}: fits with {leftover:,} MB left over"
        f"{_split_text(gpu_indices, per)}; {_disk_text(model, node)}"
    )
    return Placement(node=node.name, gpu_indices=gpu_indices, evict=(), reason=reason)


def _eviction_placement(
    model: ModelSpec, plan: _Plan, demand: Demand, wanted: float, min_residency_s: float
) -> Placement:
    node, gpu_indices, per, victims = plan
    free_after = min(
        g.free_mb + sum(v.per_gpu_mb for v in victims if g.index in v.instance.gpu_indices)
        for g in node.gpus
        if g.index in gpu_indices
    )
    named = ", ".join(v.instance.model_id for v in victims)
    top = max(demand.of(v.instance.model_id) for v in victims)
    top_cost = max(v.cost for v in victims)
    reason = (
        f"node {node.name} {_gpus_text(gpu_indices)}: {free_after:,} MB free after evicting "
        f"{named} (demand {top:g} < {wanted:g}; demand x load time {top_cost:g} < {wanted * model.load_s:g} s)"
        f"{_split_text(gpu_indices, per)}; {_disk_text(model, node)}"
    )
    if any(v.young for v in victims):
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
        f"pinned, loading or busier models (demand {wanted:g}, {model.load_s:g} s to load)"
    )

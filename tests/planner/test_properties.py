"""Properties of place() on random small fleets, checked against a brute-force oracle."""

from __future__ import annotations

from itertools import combinations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleet.planner import (
    BUSY,
    NO_CAPACITY,
    Demand,
    GpuState,
    LoadedInstance,
    ModelSpec,
    NodeState,
    NoPlacement,
    Placement,
    place,
)

NOW_S = 1_000.0
MIN_RESIDENCY_S = 120.0
MODEL_IDS = ["m0", "m1", "m2", "m3", "m4", "m5"]
REQUESTED = "wanted-model"

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# Memory accounting as stated in fleet/planner/placement.py, restated here on purpose.
def need_per_gpu(vram_mb: int, k: int) -> int:
    return -(-vram_mb // k)


def frees_per_gpu(inst: LoadedInstance) -> int:
    return inst.vram_mb // len(inst.gpu_indices)


@st.composite
def fleets(draw, max_instances: int = 6, full: bool = False) -> list[NodeState]:
    nodes = []
    instance_id = 0
    for n in range(draw(st.integers(1, 3))):
        n_gpus = draw(st.integers(1, 3))
        totals = [draw(st.sampled_from([8_000, 16_000, 24_000])) for _ in range(n_gpus)]
        used = [0] * n_gpus
        instances = []
        for _ in range(draw(st.integers(0, max_instances))):
            span = draw(st.integers(1, n_gpus))
            first = draw(st.integers(0, n_gpus - span))
            gpus = tuple(range(first, first + span))
            room = min(totals[g] - used[g] for g in gpus)
            if room < 500:
                continue
            # Shares of what is left, so GPUs end up full often enough to need evictions.
            share = draw(st.sampled_from([0.34, 0.5, 0.5, 1.0, 1.0]))
            vram = max(int(room * span * share) - draw(st.sampled_from([0, 0, 1, 333])), 100)
            per = need_per_gpu(vram, span)
            for g in gpus:
                used[g] += per
            instances.append(
                LoadedInstance(
                    instance_id=instance_id,
                    model_id=draw(st.sampled_from(MODEL_IDS)),
                    vram_mb=vram,
                    gpu_indices=gpus,
                    pinned=draw(st.sampled_from([False, False, False, True])),
                    loaded_at_s=draw(st.sampled_from([0.0, 500.0, 900.0, 990.0])),
                    reload_s=float(draw(st.integers(1, 60))),
                    evictable=draw(st.sampled_from([True, True, True, False])),
                )
            )
            instance_id += 1
        if full:
            # Top every GPU up with one more instance, so most requests need evictions.
            for g in range(n_gpus):
                room = totals[g] - used[g]
                if room >= 500:
                    used[g] += room
                    instances.append(
                        LoadedInstance(
                            instance_id=instance_id,
                            model_id=draw(st.sampled_from(MODEL_IDS)),
                            vram_mb=room,
                            gpu_indices=(g,),
                            loaded_at_s=draw(st.sampled_from([0.0, 500.0, 990.0])),
                            reload_s=float(draw(st.integers(1, 60))),
                        )
                    )
                    instance_id += 1
        gpu_states = tuple(
            GpuState(
                index=i,
                total_mb=totals[i],
                # Engines and CUDA contexts hold memory no instance accounts for.
                free_mb=totals[i] - used[i] - min(draw(st.sampled_from([0, 0, 700])), totals[i] - used[i]),
            )
            for i in range(n_gpus)
        )
        nodes.append(
            NodeState(
                name=f"node-{n}",
                gpus=gpu_states,
                instances=tuple(instances),
                models_on_disk=frozenset([REQUESTED]) if draw(st.booleans()) else frozenset(),
                online=draw(st.sampled_from([True, True, True, False])),
            )
        )
    return nodes


demands = st.fixed_dictionaries(
    {m: st.integers(0, 5) for m in MODEL_IDS} | {REQUESTED: st.sampled_from([0, 1, 3, 5, 6, 6])}
).map(lambda d: Demand({k: float(v) for k, v in d.items()}))

models = st.one_of(
    st.integers(1, 24).map(lambda n: n * 1_000),
    st.integers(500, 24_000),
    st.integers(24_001, 72_000),  # split across GPUs, or too big
).map(lambda vram: ModelSpec(REQUESTED, vram))


# --- the oracle: every legal plan, by brute force --------------------------------------


def options(node: NodeState, vram: int) -> list[tuple[int, int]]:
    if any(g.total_mb >= vram for g in node.gpus):
        return [(1, vram)]
    return [
        (k, need_per_gpu(vram, k))
        for k in range(2, len(node.gpus) + 1)
        if sum(g.total_mb >= need_per_gpu(vram, k) for g in node.gpus) >= k
    ]


def ever_fits(model: ModelSpec, nodes: list[NodeState]) -> bool:
    return any(options(n, model.vram_mb) for n in nodes if n.online)


def fits_without_eviction(model: ModelSpec, nodes: list[NodeState]) -> list[tuple[int, int, int]]:
    """(needs download, MB left over, node order) of each node's fewest-GPU fit."""
    fits = []
    online = [n for n in nodes if n.online]
    for order, node in enumerate(online):
        for k, per in options(node, model.vram_mb):
            roomy = sorted(g.free_mb for g in node.gpus if g.total_mb >= per and g.free_mb >= per)
            if len(roomy) >= k:
                download = int(REQUESTED not in node.models_on_disk)
                fits.append((download, sum(f - per for f in roomy[:k]), order))
                break
    return fits


def covers(node, group, per, victims) -> bool:
    return all(
        g.free_mb + sum(frees_per_gpu(v) for v in victims if g.index in v.gpu_indices) >= per
        for g in node.gpus
        if g.index in group
    )


def is_minimal(node, group, per, victims) -> bool:
    return all(
        not covers(node, group, per, [v for v in victims if v is not dropped]) for dropped in victims
    )


def young(inst: LoadedInstance) -> bool:
    return NOW_S - inst.loaded_at_s < MIN_RESIDENCY_S


def may_evict(inst: LoadedInstance, model: ModelSpec, demand: Demand) -> bool:
    """The rules on one victim: not pinned, not loading or draining, less demand than the
    requested model, and less demand x reload time than its demand x load time."""
    d, wanted = demand.of(inst.model_id), demand.of(model.model_id)
    return not inst.pinned and inst.evictable and d < wanted and d * inst.reload_s < wanted * model.load_s


def plan_key(node_order, node, victims, demand):
    cost = sum(demand.of(v.model_id) * v.reload_s for v in victims)
    freed = sum(v.vram_mb for v in victims)
    download = int(REQUESTED not in node.models_on_disk)
    return (cost / freed, len(victims), freed, download, node_order)


def legal_plans(model, nodes, demand, allow_young: bool) -> list[tuple]:
    wanted = demand.of(model.model_id)
    plans = []
    online = [n for n in nodes if n.online]
    for order, node in enumerate(online):
        allowed = [
            i
            for i in node.instances
            if may_evict(i, model, demand)
            and (allow_young or not young(i))
        ]
        for k, per in options(node, model.vram_mb):
            at_k = []
            for group in combinations([g.index for g in node.gpus if g.total_mb >= per], k):
                for r in range(1, len(allowed) + 1):
                    for victims in combinations(allowed, r):
                        if covers(node, group, per, victims) and is_minimal(node, group, per, victims):
                            at_k.append(plan_key(order, node, victims, demand))
            if at_k:
                plans.extend(at_k)
                break  # fewest GPUs that work on this node
    return plans


# --- checks shared by the properties ---------------------------------------------------


def check_legal(result: Placement, model, nodes, demand) -> None:
    node = next(n for n in nodes if n.name == result.node)
    assert node.online
    k = len(result.gpu_indices)
    per = need_per_gpu(model.vram_mb, k)
    assert len(set(result.gpu_indices)) == k
    assert all(g.total_mb >= per for g in node.gpus if g.index in result.gpu_indices)
    # never over capacity once the victims are gone
    assert covers(node, result.gpu_indices, per, result.evict)
    on_node = {i.instance_id for i in node.instances}
    wanted = demand.of(model.model_id)
    for victim in result.evict:
        assert victim.instance_id in on_node
        assert not victim.pinned
        assert victim.evictable
        assert demand.of(victim.model_id) < wanted  # never a busier model for a less busy one
        assert may_evict(victim, model, demand)
    assert is_minimal(node, result.gpu_indices, per, result.evict)
    assert result.reason and result.node in result.reason


@SETTINGS
@given(fleet=fleets(), demand=demands, model=models)
def test_place_matches_oracle(fleet, demand, model):
    check_against_oracle(fleet, demand, model)


@SETTINGS
@given(fleet=fleets(full=True), demand=demands, model=models)
def test_place_matches_oracle_on_full_fleets(fleet, demand, model):
    check_against_oracle(fleet, demand, model)


def check_against_oracle(fleet, demand, model) -> None:
    result = place(model, fleet, demand, now_s=NOW_S, min_residency_s=MIN_RESIDENCY_S)

    if not ever_fits(model, fleet):
        event("no capacity")
        assert isinstance(result, NoPlacement) and result.code == NO_CAPACITY
        return
    assert not (isinstance(result, NoPlacement) and result.code == NO_CAPACITY)

    fits = fits_without_eviction(model, fleet)
    if fits:
        event("fits without eviction")
        assert isinstance(result, Placement)
        assert result.evict == ()
        check_legal(result, model, fleet, demand)
        online = [n for n in fleet if n.online]
        node = next(n for n in online if n.name == result.node)
        per = need_per_gpu(model.vram_mb, len(result.gpu_indices))
        leftover = sum(g.free_mb - per for g in node.gpus if g.index in result.gpu_indices)
        download = int(REQUESTED not in node.models_on_disk)
        # weights on disk first, then best fit
        assert (download, leftover) == min(fits)[:2]
        return

    mature = legal_plans(model, fleet, demand, allow_young=False)
    anyage = mature or legal_plans(model, fleet, demand, allow_young=True)
    if not anyage:
        event("busy")
        assert isinstance(result, NoPlacement) and result.code == BUSY
        assert result.reason
        return

    assert isinstance(result, Placement), result
    assert result.evict
    check_legal(result, model, fleet, demand)
    event("evicts" + (" split" if len(result.gpu_indices) > 1 else "") + ("" if mature else " young"))
    if mature:
        assert not any(young(v) for v in result.evict)
    online = [n for n in fleet if n.online]
    order = next(i for i, n in enumerate(online) if n.name == result.node)
    assert plan_key(order, online[order], result.evict, demand) == min(anyage)


@st.composite
def crowded_gpu(draw) -> tuple[NodeState, Demand]:
    """One GPU holding more small instances than the exhaustive search takes on."""
    count = draw(st.integers(13, 30))
    instances = tuple(
        LoadedInstance(
            instance_id=i,
            model_id=f"small-{i}",
            vram_mb=draw(st.integers(500, 3_000)),
            gpu_indices=(0,),
            reload_s=float(draw(st.integers(1, 30))),
        )
        for i in range(count)
    )
    used = sum(i.vram_mb for i in instances)
    node = NodeState("crowded", (GpuState(0, used + 1_000, 1_000),), instances)
    demand = Demand(
        {REQUESTED: 10.0} | {i.model_id: float(draw(st.integers(0, 9))) for i in instances}
    )
    return node, demand


@SETTINGS
@given(crowded=crowded_gpu(), vram=st.integers(2_000, 30_000))
def test_greedy_cover_is_legal_and_minimal(crowded, vram):
    node, demand = crowded
    model = ModelSpec(REQUESTED, vram)
    result = place(model, [node], demand, now_s=NOW_S, min_residency_s=MIN_RESIDENCY_S)
    if vram > node.gpus[0].total_mb:
        assert isinstance(result, NoPlacement) and result.code == NO_CAPACITY
    elif vram <= 1_000:
        assert isinstance(result, Placement) and result.evict == ()
    elif isinstance(result, Placement):
        check_legal(result, model, [node], demand)
    else:
        # only when every instance allowed to go together still leaves it short
        allowed = [i for i in node.instances if may_evict(i, model, demand)]
        assert not covers(node, (0,), vram, allowed)
        assert result.code == BUSY


@st.composite
def wide_nodes(draw) -> list[NodeState]:
    """Nodes of 8 GPUs: too many groups of k GPUs to try each, so the greedy split search runs."""
    nodes = []
    instance_id = 0
    for n in range(draw(st.integers(1, 2))):
        used = [0] * 8
        instances = []
        for _ in range(draw(st.integers(0, 30))):
            span = draw(st.sampled_from([1, 1, 1, 2]))
            first = draw(st.integers(0, 8 - span))
            gpus = tuple(range(first, first + span))
            room = min(80_000 - used[g] for g in gpus)
            if room < 1_000:
                continue
            vram = int(room * span * draw(st.sampled_from([0.5, 1.0, 1.0])))
            for g in gpus:
                used[g] += need_per_gpu(vram, span)
            instances.append(
                LoadedInstance(
                    instance_id=instance_id,
                    model_id=draw(st.sampled_from(MODEL_IDS)),
                    vram_mb=vram,
                    gpu_indices=gpus,
                    pinned=draw(st.sampled_from([False, False, False, True])),
                    loaded_at_s=draw(st.sampled_from([0.0, 990.0])),
                    reload_s=float(draw(st.integers(1, 60))),
                )
            )
            instance_id += 1
        nodes.append(
            NodeState(
                name=f"wide-{n}",
                gpus=tuple(GpuState(i, 80_000, 80_000 - used[i]) for i in range(8)),
                instances=tuple(instances),
            )
        )
    return nodes


@SETTINGS
@given(fleet=wide_nodes(), demand=demands, vram=st.integers(80_001, 400_000))
def test_split_over_many_gpus_is_legal_and_minimal(fleet, demand, vram):
    model = ModelSpec(REQUESTED, vram)
    result = place(model, fleet, demand, now_s=NOW_S, min_residency_s=MIN_RESIDENCY_S)

    def can_make_room(node: NodeState) -> bool:
        allowed = [i for i in node.instances if may_evict(i, model, demand)]
        return any(
            sum(covers(node, (g.index,), per, allowed) for g in node.gpus) >= k
            for k, per in options(node, vram)
        )

    if fits_without_eviction(model, fleet):
        event("fits without eviction")
        assert isinstance(result, Placement) and result.evict == ()
    elif any(can_make_room(n) for n in fleet):
        event(f"evicts, split over {len(result.gpu_indices)}" if isinstance(result, Placement) else "?")
        assert isinstance(result, Placement), result
        check_legal(result, model, fleet, demand)
    else:
        event(getattr(result, "code", "?"))
        assert isinstance(result, NoPlacement) and result.code in (BUSY, NO_CAPACITY)
        assert result.code == (BUSY if any(options(n, vram) for n in fleet) else NO_CAPACITY)


# --- replicas ----------------------------------------------------------------------------


@st.composite
def fleets_serving_the_model(draw) -> list[NodeState]:
    """Random fleets where some nodes already hold a replica of the requested model."""
    nodes = draw(fleets())
    out = []
    for node in nodes:
        if draw(st.booleans()):
            replica = LoadedInstance(instance_id=10_000 + len(out), model_id=REQUESTED, vram_mb=100,
                                     gpu_indices=(node.gpus[0].index,), evictable=draw(st.booleans()))
            node = NodeState(name=node.name, gpus=node.gpus, instances=(*node.instances, replica),
                             models_on_disk=node.models_on_disk, online=node.online)
        out.append(node)
    return out


@SETTINGS
@given(fleet=fleets_serving_the_model(), demand=demands, model=models)
def test_a_replica_goes_where_the_model_is_not_legally_and_as_place_would_there(fleet, demand, model):
    from fleet.planner import place_replica

    result = place_replica(model, fleet, demand, now_s=NOW_S, min_residency_s=MIN_RESIDENCY_S)
    holders = {n.name for n in fleet if any(i.model_id == model.model_id for i in n.instances)}
    others = [n for n in fleet if n.name not in holders]
    if isinstance(result, Placement):
        assert result.node not in holders, "never a second replica on the same node"
        assert all(v.model_id != model.model_id for v in result.evict), "a replica never evicts another"
        check_legal(result, model, others, demand)  # never over capacity, never a busier or pinned victim
    assert result == place(model, others, demand, now_s=NOW_S, min_residency_s=MIN_RESIDENCY_S) \
        or (not any(n.online for n in others) and isinstance(result, NoPlacement))

"""Readable examples of the planner's decisions: where a model goes, what it evicts, and why."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

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
    idle_instances,
    place,
)

GB = 1024
NOW_S = 10_000.0
LONG_AGO_S = 0.0  # loaded long before NOW_S, past any minimum residency


def gpu(index: int, free_gb: float, total_gb: int = 80) -> GpuState:
    return GpuState(index=index, total_mb=total_gb * GB, free_mb=int(free_gb * GB))


def loaded(
    instance_id: int,
    model_id: str,
    gb: float,
    gpus: tuple[int, ...] = (0,),
    *,
    loaded_at_s: float = LONG_AGO_S,
    reload_s: float = 20.0,
    pinned: bool = False,
    evictable: bool = True,
) -> LoadedInstance:
    return LoadedInstance(
        instance_id=instance_id,
        model_id=model_id,
        vram_mb=int(gb * GB),
        gpu_indices=gpus,
        pinned=pinned,
        loaded_at_s=loaded_at_s,
        reload_s=reload_s,
        evictable=evictable,
    )


def node(name: str, *gpus: GpuState, instances=(), on_disk=(), online: bool = True) -> NodeState:
    return NodeState(
        name=name,
        gpus=tuple(gpus),
        instances=tuple(instances),
        models_on_disk=frozenset(on_disk),
        online=online,
    )


def decide(model: ModelSpec, nodes: list[NodeState], demand: dict[str, float] | None = None, **kw):
    return place(model, nodes, Demand(demand or {}), now_s=kw.pop("now_s", NOW_S), **kw)


QWEN_7B = ModelSpec("qwen2.5-7b", 17 * GB)
CODER_32B = ModelSpec("qwen2.5-coder-32b", 70 * GB)
CODER_NEXT = ModelSpec("qwen3-coder-next", 160 * GB)


# --- without eviction --------------------------------------------------------------------


def test_prefers_the_node_with_weights_on_disk_over_a_tighter_fit():
    tight = node("gpu-a", gpu(0, 18))
    roomy_with_weights = node("gpu-b", gpu(0, 70), on_disk=["qwen2.5-7b"])

    result = decide(QWEN_7B, [tight, roomy_with_weights])

    assert isinstance(result, Placement)
    assert (result.node, result.gpu_indices, result.evict) == ("gpu-b", (0,), ())
    assert result.reason == "node gpu-b gpu 0: fits with 54,272 MB left over; weights on disk"


def test_best_fit_leaves_the_least_memory_over():
    nodes = [
        node("gpu-a", gpu(0, 60), gpu(1, 20)),
        node("gpu-b", gpu(0, 40)),
    ]

    result = decide(QWEN_7B, nodes)

    assert isinstance(result, Placement)
    assert (result.node, result.gpu_indices) == ("gpu-a", (1,))
    assert result.reason.endswith("weights to download (~60 s)")


def test_fits_without_evicting_even_when_cheap_victims_exist():
    full = node("gpu-a", gpu(0, 1), instances=[loaded(1, "idle-model", 79)])
    empty = node("gpu-b", gpu(0, 80))

    result = decide(CODER_32B, [full, empty], {"qwen2.5-coder-32b": 5})

    assert isinstance(result, Placement)
    assert (result.node, result.evict) == ("gpu-b", ())


def test_offline_nodes_are_ignored():
    nodes = [node("gone", gpu(0, 80), online=False), node("here", gpu(0, 20))]

    result = decide(QWEN_7B, nodes)

    assert isinstance(result, Placement) and result.node == "here"


def test_a_model_larger_than_any_gpu_is_split_evenly_over_the_fewest_gpus():
    nodes = [node("gpu-a", gpu(0, 80), gpu(1, 80), gpu(2, 80), gpu(3, 80))]

    result = decide(CODER_NEXT, nodes)

    assert isinstance(result, Placement)
    assert len(result.gpu_indices) == 2
    assert "81,920 MB on each of 2 GPUs" in result.reason


def test_a_split_uses_more_gpus_only_when_fewer_have_no_room():
    # 100 GB over 2 GPUs needs 50 GB each, which no pair has; over 3 it needs 34,134 MB each.
    nodes = [node("gpu-a", gpu(0, 45), gpu(1, 45), gpu(2, 45), gpu(3, 10))]

    result = decide(ModelSpec("syn-moe-100b", 100 * GB), nodes)

    assert isinstance(result, Placement)
    assert result.gpu_indices == (0, 1, 2)
    assert result.evict == ()


def test_a_model_that_fits_one_gpu_is_never_split():
    nodes = [node("gpu-a", gpu(0, 40), gpu(1, 40))]

    result = decide(CODER_32B, nodes)  # 70 GB: 80 GB GPUs could hold it, just not now

    assert isinstance(result, NoPlacement) and result.code == BUSY


# --- no capacity -------------------------------------------------------------------------


def test_no_capacity_when_even_an_empty_fleet_could_not_hold_it():
    nodes = [node("gpu-a", gpu(0, 0, total_gb=80)), node("gpu-b", gpu(0, 48, 48), gpu(1, 48, 48))]

    result = decide(ModelSpec("qwen-235b", 140_000), nodes, {"qwen-235b": 10})

    assert result == NoPlacement(
        NO_CAPACITY, "qwen-235b needs 140,000 MB; the largest node has 98,304 MB (2 x up to 49,152 MB)"
    )


def test_no_capacity_when_no_node_is_online():
    result = decide(QWEN_7B, [node("gone", gpu(0, 80), online=False)])

    assert result == NoPlacement(NO_CAPACITY, "qwen2.5-7b needs 17,408 MB; no node is online")


def test_busy_is_not_no_capacity_when_an_empty_node_would_hold_it():
    busy_node = node("gpu-a", gpu(0, 0), instances=[loaded(1, "qwen2.5-coder-32b", 80, pinned=True)])

    result = decide(QWEN_7B, [busy_node], {"qwen2.5-7b": 9})

    assert isinstance(result, NoPlacement)
    assert result.code == BUSY
    assert result.reason == (
        "qwen2.5-7b needs 17,408 MB; no node can make room without evicting pinned, loading or "
        "busier models (demand 9, 20 s to load)"
    )


# --- eviction ----------------------------------------------------------------------------


def test_evicts_a_lower_demand_model_and_says_why():
    full = node(
        "gpu-a",
        gpu(0, 3),
        instances=[loaded(1, "llama-8b", 16), loaded(2, "busy-model", 61)],
        on_disk=["qwen2.5-7b"],
    )

    result = decide(QWEN_7B, [full], {"qwen2.5-7b": 7, "llama-8b": 1, "busy-model": 50})

    assert isinstance(result, Placement)
    assert [v.model_id for v in result.evict] == ["llama-8b"]
    assert result.reason == (
        "node gpu-a gpu 0: 19,456 MB free after evicting llama-8b (demand 1 < 7; demand x load time 20 < 140 s); "
        "weights on disk"
    )


def test_a_slow_to_reload_model_is_not_evicted_for_a_quick_one_asked_for_a_little_more():
    slow = node("gpu-a", gpu(0, 0), instances=[loaded(1, "big-slow", 80, reload_s=80)])
    quick = ModelSpec("small-quick", 20 * GB, load_s=10)

    # 3 requests x 80 s of reload at stake for big-slow, 4 x 10 s for small-quick: it waits.
    kept = decide(quick, [slow], {"small-quick": 4, "big-slow": 3})
    assert isinstance(kept, NoPlacement) and kept.code == BUSY
    assert kept.reason.endswith("(demand 4, 10 s to load)")

    # As its waiting requests age, its demand grows until its users stand to lose more.
    taken = decide(quick, [slow], {"small-quick": 25, "big-slow": 3})
    assert isinstance(taken, Placement) and [v.model_id for v in taken.evict] == ["big-slow"]
    assert "(demand 3 < 25; demand x load time 240 < 250 s)" in taken.reason


@pytest.mark.parametrize(
    "blocker",
    [
        loaded(1, "pinned-model", 79, pinned=True),
        loaded(1, "still-loading", 79, evictable=False),
        loaded(1, "as-busy-as-you", 79),  # same demand as the request: not strictly lower
    ],
    ids=["pinned", "loading", "equal-demand"],
)
def test_never_evicts_pinned_loading_or_not_strictly_lower_demand(blocker):
    full = node("gpu-a", gpu(0, 1), instances=[blocker])

    result = decide(QWEN_7B, [full], {"qwen2.5-7b": 4, "as-busy-as-you": 4, "pinned-model": 0})

    assert isinstance(result, NoPlacement) and result.code == BUSY


def test_a_model_with_no_demand_evicts_nothing():
    full = node("gpu-a", gpu(0, 1), instances=[loaded(1, "idle-model", 79)])

    result = decide(QWEN_7B, [full], {})

    assert isinstance(result, NoPlacement) and result.code == BUSY


def test_prefers_the_victims_cheapest_per_mb_freed():
    # Each GPU needs one eviction; gpu 1's victim costs less per MB (0 x 20 s vs 2 x 20 s).
    full = node(
        "gpu-a",
        gpu(0, 0),
        gpu(1, 0),
        instances=[loaded(1, "warm-model", 80, (0,)), loaded(2, "idle-model", 80, (1,))],
    )

    result = decide(QWEN_7B, [full], {"qwen2.5-7b": 5, "warm-model": 2})

    assert isinstance(result, Placement)
    assert (result.gpu_indices, [v.model_id for v in result.evict]) == ((1,), ["idle-model"])


def test_evicts_a_minimal_set_when_one_victim_is_exactly_enough():
    # 7 GB free; the 7B needs 17 GB; the 10 GB victim is exactly enough on its own.
    full = node(
        "gpu-a",
        gpu(0, 7),
        instances=[loaded(1, "ten-gb", 10), loaded(2, "five-gb", 5), loaded(3, "rest", 58)],
    )

    result = decide(QWEN_7B, [full], {"qwen2.5-7b": 3, "rest": 9})

    assert isinstance(result, Placement)
    assert [v.model_id for v in result.evict] == ["ten-gb"]


def test_victims_of_a_split_model_free_memory_on_each_of_their_gpus():
    # A 40 GB model split over gpus 0 and 1 gives back 20 GB on each.
    two_gpu = node(
        "gpu-a",
        gpu(0, 0),
        gpu(1, 0),
        instances=[
            loaded(1, "split-40", 40, (0, 1)),
            loaded(2, "big-a", 60, (0,)),
            loaded(3, "big-b", 60, (1,)),
        ],
    )

    result = decide(QWEN_7B, [two_gpu], {"qwen2.5-7b": 3, "big-a": 10, "big-b": 10})

    assert isinstance(result, Placement)
    assert [v.model_id for v in result.evict] == ["split-40"]
    assert result.reason.startswith("node gpu-a gpu 0: 20,480 MB free after evicting split-40")


def test_a_split_model_evicts_on_the_gpus_it_takes():
    node_a = node(
        "gpu-a",
        gpu(0, 0),
        gpu(1, 0),
        instances=[loaded(1, "left", 80, (0,)), loaded(2, "right", 80, (1,))],
    )

    result = decide(CODER_NEXT, [node_a], {"qwen3-coder-next": 4, "left": 1, "right": 2})

    assert isinstance(result, Placement)
    assert result.gpu_indices == (0, 1)
    assert {v.model_id for v in result.evict} == {"left", "right"}
    assert "81,920 MB on each of 2 GPUs" in result.reason


def test_recently_loaded_models_are_spared_while_older_ones_make_room():
    # The young model is cheaper to evict, but it was loaded 30 s ago: anti-thrash.
    full = node(
        "gpu-a",
        gpu(0, 0),
        gpu(1, 0),
        instances=[
            loaded(1, "just-loaded", 80, (0,), loaded_at_s=NOW_S - 30),
            loaded(2, "settled", 80, (1,), loaded_at_s=NOW_S - 3_600),
        ],
    )

    result = decide(QWEN_7B, [full], {"qwen2.5-7b": 5, "settled": 2})

    assert isinstance(result, Placement)
    assert [v.model_id for v in result.evict] == ["settled"]
    assert "loaded under" not in result.reason


def test_recently_loaded_models_go_when_nothing_else_can():
    full = node("gpu-a", gpu(0, 0), instances=[loaded(1, "just-loaded", 80, loaded_at_s=NOW_S - 30)])

    result = decide(QWEN_7B, [full], {"qwen2.5-7b": 5})

    assert isinstance(result, Placement)
    assert [v.model_id for v in result.evict] == ["just-loaded"]
    assert result.reason.endswith("evicts a model loaded under 120 s ago, no other room")


def test_min_residency_is_a_parameter():
    full = node(
        "gpu-a",
        gpu(0, 0),
        gpu(1, 0),
        instances=[
            loaded(1, "cheap-young", 80, (0,), loaded_at_s=NOW_S - 30),
            loaded(2, "dear-old", 80, (1,), loaded_at_s=LONG_AGO_S),
        ],
    )
    demand = {"qwen2.5-7b": 5, "dear-old": 3}

    strict = decide(QWEN_7B, [full], demand)
    relaxed = decide(QWEN_7B, [full], demand, min_residency_s=10.0)

    assert [v.model_id for v in strict.evict] == ["dear-old"]
    assert [v.model_id for v in relaxed.evict] == ["cheap-young"]


# --- idle instances ----------------------------------------------------------------------


def test_idle_instances_are_those_without_a_request_for_a_window():
    fleet = [
        node(
            "gpu-a",
            gpu(0, 0),
            instances=[
                loaded(1, "stale", 10, loaded_at_s=0.0),
                loaded(2, "fresh", 10, loaded_at_s=0.0),
                loaded(3, "never-asked", 10, loaded_at_s=100.0),
                loaded(4, "pinned-stale", 10, pinned=True),
                loaded(5, "draining-stale", 10, evictable=False),
                # asked for long ago, but its (slow) load finished only recently
                loaded(6, "slow-load", 10, loaded_at_s=9_800.0),
            ],
        ),
        node("gone", gpu(0, 0), instances=[loaded(7, "offline-stale", 10)], online=False),
    ]
    last_request_s = {
        "stale": 1_000.0,
        "fresh": 9_900.0,
        "pinned-stale": 0.0,
        "draining-stale": 0.0,
        "slow-load": 100.0,
        "offline-stale": 0.0,
    }

    idle = idle_instances(fleet, last_request_s, now_s=NOW_S, window_s=600.0)

    # idlest first: "never-asked" counts from its load at 100 s, "stale" from its request at 1,000 s
    assert [(name, inst.model_id) for name, inst in idle] == [
        ("gpu-a", "never-asked"),
        ("gpu-a", "stale"),
    ]


def test_demand_of_a_model_never_requested_is_zero():
    assert Demand({"a": 3}).of("b") == 0.0
    assert Demand({"a": 3}).of("a") == 3.0


# --- purity ------------------------------------------------------------------------------


def test_the_planner_imports_only_the_standard_library():
    package = Path(__file__).resolve().parents[2] / "fleet" / "planner"
    for source in package.glob("*.py"):
        for statement in ast.walk(ast.parse(source.read_text())):
            if isinstance(statement, ast.Import):
                names = [alias.name for alias in statement.names]
            elif isinstance(statement, ast.ImportFrom) and statement.level == 0:
                names = [statement.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name.startswith("fleet.planner"), (
                    f"{source.name} imports {name}"
                )


def test_recency_weight_falls_from_one_to_zero_across_the_window():
    from fleet.planner import recency_weight

    assert recency_weight(0, 600) == 1.0
    assert recency_weight(300, 600) == 0.5
    assert recency_weight(600, 600) == 0.0
    assert recency_weight(900, 600) == 0.0
    assert recency_weight(-5, 600) == 1.0  # clock skew between hub processes never counts extra
    assert recency_weight(10, 0) == 0.0

"""The placement planner: pure functions from the fleet's state and demand to a decision."""

from fleet.planner.placement import (
    MAX_NODES_COMPARED,
    freed_per_gpu_mb,
    idle_instances,
    place,
    place_replica,
    share_mb,
    split_options,
)
from fleet.planner.types import (
    BUSY,
    NO_CAPACITY,
    Demand,
    GpuState,
    LoadedInstance,
    ModelSpec,
    NodeState,
    NoPlacement,
    Placement,
    recency_weight,
)

__all__ = [
    "BUSY",
    "MAX_NODES_COMPARED",
    "NO_CAPACITY",
    "Demand",
    "GpuState",
    "LoadedInstance",
    "ModelSpec",
    "NodeState",
    "NoPlacement",
    "Placement",
    "freed_per_gpu_mb",
    "idle_instances",
    "place",
    "place_replica",
    "recency_weight",
    "share_mb",
    "split_options",
]

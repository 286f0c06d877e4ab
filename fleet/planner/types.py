"""Plain data the planner reads and returns: the fleet as it is, demand, and a decision."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A catalog model the hub was asked to serve."""

    model_id: str
    vram_mb: int
    pinned: bool = False
    load_s: float = 20.0  # time to start the engine once weights are on disk
    download_s: float = 60.0  # time to fetch weights when not on disk


@dataclass(frozen=True, slots=True)
class LoadedInstance:
    """A model placed on a node: loading, ready or draining."""

    instance_id: int
    model_id: str
    vram_mb: int
    gpu_indices: tuple[int, ...]
    pinned: bool = False
    loaded_at_s: float = 0.0  # wall-clock seconds when it became ready (or was placed)
    reload_s: float = 20.0  # cost to bring it back if evicted
    evictable: bool = True  # False while still loading or already draining


@dataclass(frozen=True, slots=True)
class GpuState:
    """One device of a node; a CPU-only node is one pseudo-device with its memory budget."""

    index: int
    total_mb: int
    free_mb: int  # from the last heartbeat, already net of loaded instances


@dataclass(frozen=True, slots=True)
class NodeState:
    """A machine of the fleet as its last heartbeat described it."""

    name: str
    gpus: tuple[GpuState, ...]
    instances: tuple[LoadedInstance, ...] = ()
    models_on_disk: frozenset[str] = frozenset()
    online: bool = True


def recency_weight(age_s: float, window_s: float) -> float:
    """How much one request `age_s` old counts in a demand window: 1 now, falling linearly to 0
    at the window's end. A model asked for a minute ago then outweighs one whose burst ended nine
    minutes ago, instead of the two counting alike until the burst leaves the window
    (bench/simulate.py; docs/performance.md)."""
    if window_s <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - age_s / window_s))


@dataclass(frozen=True, slots=True)
class Demand:
    """Requests per model (served + unmet) in the sliding demand window, each weighted by
    `recency_weight`; requests waiting for room add to their model's count as they age."""

    per_model: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def of(self, model_id: str) -> float:
        return float(self.per_model.get(model_id, 0.0))


@dataclass(frozen=True, slots=True)
class Placement:
    """Load the model on these GPUs of this node, after draining `evict`."""

    node: str
    gpu_indices: tuple[int, ...]
    evict: tuple[LoadedInstance, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class NoPlacement:
    """Why the model cannot be placed now.

    `code` is "no_capacity" when no online node could ever hold the model, even empty, and
    "busy" when it could, but only by evicting pinned, loading/draining or busier models.
    """

    code: str
    reason: str


NO_CAPACITY = "no_capacity"
BUSY = "busy"

"""Live fleet state shared by the hub and the node agents through Redis: each model's warming state
(stored, published to gateway waiters and pushed to the playground's channel-layer group), the phase
names and labels people see, and the requests in flight per instance."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace

from asgiref.sync import async_to_sync

from porten.redis import redis_client
from porten.units import MB

logger = logging.getLogger(__name__)

STATE_TTL_S = 24 * 3600

# The six phases a person or a script sees. A draining instance still answers; an unloaded one
# leaves its model cold.
PUBLIC_PHASES = ("idle", "queued", "downloading", "loading", "ready", "failed")
PUBLIC_PHASE = {"draining": "ready", "unloading": "idle", "stopped": "idle"}

# The one map of phase labels: the playground's picker badges (server-rendered, and the page's
# script through its config). "{pct}" is the download's whole percent.
PHASE_LABELS = {
    "idle": {"text": "cold", "kind": "cold"},
    "queued": {"text": "warming", "kind": "warming"},
    "downloading": {"text": "warming {pct}%", "kind": "warming"},
    "loading": {"text": "loading", "kind": "warming"},
    "ready": {"text": "ready", "kind": "ready"},
    "failed": {"text": "failed", "kind": "failed"},
}


def public_phase(phase: str) -> str:
    return PUBLIC_PHASE.get(phase, phase)


def phase_label(phase: str, pct: float = 0.0) -> dict:
    label = PHASE_LABELS.get(public_phase(phase), PHASE_LABELS["idle"])
    return {"text": label["text"].replace("{pct}", str(int(pct))), "kind": label["kind"]}


def state_key(model_id: str) -> str:
    return f"porten:warming:{model_id}"


def events_channel(model_id: str) -> str:
    return f"porten:events:{model_id}"


def warming_group(model_id: str) -> str:
    # Channel-layer group names allow only ASCII letters, digits, hyphens, underscores and periods.
    return f"warming.{model_id}"


# The operators' fleet page (playground.consumers.FleetConsumer): told that something changed, it
# reads the fleet afresh, so the message carries nothing.
FLEET_GROUP = "fleet"


@dataclass(frozen=True)
class WarmingState:
    """One model's load as the node last reported it. `as_dict()` is the wire shape of the warming
    endpoint, the websocket and the `warming` member of a 503 model_warming."""

    model: str
    phase: str = "idle"
    instance: int | None = None
    node: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float = 0.0
    error: str = ""
    load_seconds: float | None = None
    updated_at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    @property
    def pct(self) -> float:
        if self.bytes_total:
            return round(100.0 * self.bytes_done / self.bytes_total, 1)
        return 100.0 if self.phase in ("loading", "ready") else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.rate_bps > 0 and self.bytes_total > self.bytes_done:
            return round((self.bytes_total - self.bytes_done) / self.rate_bps, 1)
        return None

    def public(self) -> WarmingState:
        """The same state under its public phase name."""
        phase = public_phase(self.phase)
        return self if phase == self.phase else replace(self, phase=phase)

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "ready": self.ready,
            "phase": self.phase,
            "done_mb": round(self.bytes_done / MB, 1),
            "total_mb": round(self.bytes_total / MB, 1),
            "pct": self.pct,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate_mbps": round(self.rate_bps / MB, 1),
            "eta_s": self.eta_s,
            "instance": self.instance,
            "node": self.node,
            "error": self.error,
            "load_seconds": self.load_seconds,
            "updated_at": self.updated_at,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> WarmingState | None:
        if not raw:
            return None
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            return None


def instance_state(instance, *, rate_bps: float = 0.0) -> WarmingState:
    """An Instance row's state (fleet.models.Instance, with its model and node)."""
    return WarmingState(
        model=instance.model.model_id, phase=instance.phase, instance=instance.pk, node=instance.node.name,
        bytes_done=instance.bytes_done, bytes_total=instance.bytes_total,
        rate_bps=rate_bps or instance.download_rate_bps, error=instance.last_error,
        load_seconds=instance.load_seconds,
    )


def publish_state(state: WarmingState) -> None:
    """Store and broadcast one model's state. Best effort: a failed push never fails a load."""
    payload = state.to_json()
    try:
        pipe = redis_client().pipeline(transaction=False)
        pipe.set(state_key(state.model), payload, ex=STATE_TTL_S)
        pipe.publish(events_channel(state.model), payload)
        pipe.execute()
    except Exception:
        logger.warning("could not publish state of %s to Redis", state.model, exc_info=True)
    _group_send([(warming_group(state.model), {"type": "warming.update", "state": state.public().as_dict()}),
                 (FLEET_GROUP, {"type": "fleet.changed"})], about=state.model)


def fleet_changed() -> None:
    """Tell open fleet pages that a node changed (its heartbeat). Best effort, as every push."""
    _group_send([(FLEET_GROUP, {"type": "fleet.changed"})], about="the fleet")


def _group_send(messages: list[tuple[str, dict]], *, about: str) -> None:
    try:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return

        async def send_all() -> None:  # one trip through async_to_sync for all of them
            for group, message in messages:
                await layer.group_send(group, message)

        async_to_sync(send_all)()
    except Exception:
        logger.warning("could not push the state of %s to the channel layer", about, exc_info=True)


def instance_publish(instance, *, rate_bps: float = 0.0) -> None:
    publish_state(instance_state(instance, rate_bps=rate_bps))


def read_state(model_id: str) -> WarmingState | None:
    return WarmingState.from_json(redis_client().get(state_key(model_id)))


# --- requests in flight: written by the gateway's tallies, read by a draining node -------------

def inflight_key(instance_id: int) -> str:
    """A hash of hub process -> requests it has in flight on the instance."""
    return f"porten:inflight:{instance_id}"


def inflight_count(instance_id: int) -> int:
    """Requests in flight on the instance across every hub process."""
    return sum(max(0, int(v)) for v in redis_client().hvals(inflight_key(instance_id)))

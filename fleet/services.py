"""The hub's writes to fleet state: placing an instance, failing one whose node is gone, draining nodes."""
from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from catalog.models import CatalogModel

from .dispatch import instance_enqueue_load
from .live import instance_publish
from .models import ACTIVE_PHASES, Instance, Node, Phase

logger = logging.getLogger(__name__)


def instance_create(*, model: CatalogModel, node: Node, gpu_indices: list[int] | None = None, reason: str = "") -> Instance:
    """A new queued instance with its load enqueued on the node's queue once the row is committed.
    Raises IntegrityError when the model already has a live instance (single flight)."""
    with transaction.atomic():
        instance = Instance.objects.create(
            model=model, node=node, phase=Phase.QUEUED, gpu_indices=gpu_indices or [0], vram_mb=model.vram_mb,
            placement_reason=reason,
        )
        transaction.on_commit(lambda: instance_enqueue_load(instance))
    instance_publish(instance)
    return instance


def instance_fail_unreachable(*, instance_id: int, url: str, error: str) -> None:
    """The hub cannot connect to a ready engine (its node answers its own health checks): fail it
    with a reason an operator can act on, so the model is placed again."""
    instance = Instance.objects.filter(pk=instance_id).select_related("model", "node").first()
    if instance is not None:
        instance_fail_lost(instance=instance, reason=(
            f"the hub cannot reach the engine at {url} ({error}): check the node's PORTEN_NODE_ADDRESS "
            f"({instance.node.address}) and that the hub may connect to it"))


def instance_fail_lost(*, instance: Instance, reason: str) -> None:
    """Fail an instance whose node is gone, without touching processes (they are on that node);
    the node's agent stops any leftover engine when it comes back."""
    if Instance.objects.filter(pk=instance.pk, phase__in=ACTIVE_PHASES).update(
            phase=Phase.FAILED, last_error=reason, stopped_at=timezone.now(), updated_at=timezone.now()):
        instance.phase, instance.last_error = Phase.FAILED, reason
        instance_publish(instance)
        logger.warning("%s failed: %s", instance, reason)


class UnknownNode(Exception):
    pass


def node_set_draining(*, name: str, draining: bool) -> Node:
    """Drain a node (no new placements; what it serves moves elsewhere when next requested, and
    unloads once ready elsewhere or unused: fleet.placement.nodes_drain_sweep), or take it back."""
    if not Node.objects.filter(name=name).update(draining=draining):
        raise UnknownNode(f"no node named {name!r}")
    node = Node.objects.get(name=name)
    logger.info("node %s %s", name, "draining" if draining else "taking placements again")
    return node

"""Celery adapters of the hub (beat, on the hub queue): a service call, a short result out."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from celery import shared_task
from django.db import close_old_connections

from .placement import (
    instances_requeue_lost, instances_restore_evicted, instances_unload_idle, nodes_drain_sweep, nodes_fail_lost,
    replicas_autoscale,
)

T = TypeVar("T")


def _then_close(service: Callable[[], T]) -> T:
    """The service's result; the worker thread's database connection is checked afterwards (beat
    tasks run outside a request, where Django would recycle it)."""
    try:
        return service()
    finally:
        close_old_connections()


@shared_task
def unload_idle_instances() -> list[int]:
    """Unload models idle for a whole demand window."""
    return _then_close(instances_unload_idle)


@shared_task
def restore_evicted_models() -> list[int]:
    """Bring models evicted for room back into memory that came free."""
    return _then_close(instances_restore_evicted)


@shared_task
def fail_lost_nodes() -> list[int]:
    """Fail the instances of nodes that stopped sending heartbeats."""
    return _then_close(nodes_fail_lost)


@shared_task
def autoscale_replicas() -> dict[str, list[int]]:
    """Add or remove replicas of models with max_replicas > 1 or min_replicas > 0."""
    return _then_close(replicas_autoscale)


@shared_task
def move_off_draining_nodes() -> list[int]:
    """Unload what draining nodes serve once it is ready elsewhere or unused."""
    return _then_close(nodes_drain_sweep)


@shared_task
def requeue_lost_loads() -> list[int]:
    """Send again the loads that stayed queued on an idle node: their message was lost."""
    return _then_close(instances_requeue_lost)

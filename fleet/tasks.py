"""Celery adapters: ids in, a service call, a short result out."""
from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from . import agent  # noqa: F401  (connects the node agent's worker signals)
from .services import instance_load, instance_unload


@shared_task(acks_late=True, ignore_result=False)
def load_instance(instance_id: int) -> str:
    try:
        return instance_load(instance_id=instance_id)
    finally:
        close_old_connections()


@shared_task(acks_late=True, ignore_result=False)
def unload_instance(instance_id: int) -> str:
    try:
        return instance_unload(instance_id=instance_id)
    finally:
        close_old_connections()


@shared_task
def unload_idle_instances() -> list[int]:
    """Beat, on the hub queue: unload models idle for a whole demand window."""
    from .placement import instances_unload_idle

    try:
        return instances_unload_idle()
    finally:
        close_old_connections()


@shared_task
def restore_evicted_models() -> list[int]:
    """Beat, on the hub queue: bring models evicted for room back into memory that came free."""
    from .placement import instances_restore_evicted

    try:
        return instances_restore_evicted()
    finally:
        close_old_connections()

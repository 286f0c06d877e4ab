"""Celery adapters of the hub (beat, on the hub queue): a service call, a short result out."""
from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from .placement import instances_restore_evicted, instances_unload_idle


@shared_task
def unload_idle_instances() -> list[int]:
    """Unload models idle for a whole demand window."""
    try:
        return instances_unload_idle()
    finally:
        close_old_connections()


@shared_task
def restore_evicted_models() -> list[int]:
    """Bring models evicted for room back into memory that came free."""
    try:
        return instances_restore_evicted()
    finally:
        close_old_connections()

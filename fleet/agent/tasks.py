"""Celery adapters of the node agent, on the node's own queue: ids in, a service call, a short result out."""
from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from fleet.dispatch import LOAD_TASK, UNLOAD_TASK

from .services import instance_load, instance_unload


@shared_task(name=LOAD_TASK, acks_late=True, ignore_result=False)
def load_instance(instance_id: int) -> str:
    try:
        return instance_load(instance_id=instance_id)
    finally:
        close_old_connections()


@shared_task(name=UNLOAD_TASK, acks_late=True, ignore_result=False)
def unload_instance(instance_id: int) -> str:
    try:
        return instance_unload(instance_id=instance_id)
    finally:
        close_old_connections()

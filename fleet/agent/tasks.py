"""Celery adapters of the node agent, on the node's own queue: ids in, a service call, a short result out."""
from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from fleet.dispatch import LOAD_TASK, UNLOAD_TASK

from .services import instance_load, instance_unload


# Acknowledged on receipt, not at the end (the default here): the database is the truth of a load,
# claims make a repeat harmless, and an agent that restarts requeues the loads it cut off
# (services.node_reconcile). A message left unacknowledged for a whole download is what makes the
# worker exit when Redis goes away under it (Celery 5.7 with kombu 5.7 fails to restore it:
# "Unrecoverable error: AttributeError ... 'hostname'"), instead of reconnecting.
@shared_task(name=LOAD_TASK, acks_late=False, ignore_result=False)
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

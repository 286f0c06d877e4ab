"""Celery adapters of porten (beat, on the hub queue)."""
from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from .usage import usage_persist


@shared_task
def persist_usage() -> int:
    """Move the usage the hub processes tallied in Redis into the database."""
    try:
        return usage_persist()
    finally:
        close_old_connections()

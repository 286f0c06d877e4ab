"""Porten's Celery app; node queues are named here and nowhere else."""
from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "porten.settings")

app = Celery("porten")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def node_queue(node_name: str) -> str:
    """The Celery queue that only the worker of `node_name` consumes."""
    return f"node.{node_name}"

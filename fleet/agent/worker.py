"""The node agent inside this node's Celery worker: reconcile on start, then heartbeat and supervise.
The handlers are connected by AgentConfig.ready() and act only in a worker started by
`manage.py node_worker` (a hub-only worker runs no agent)."""
from __future__ import annotations

import logging
import os
import threading

from django.conf import settings
from django.db import close_old_connections

from .services import node_heartbeat, node_reconcile, node_supervise

logger = logging.getLogger(__name__)

AGENT_ENV = "PORTEN_NODE_AGENT"

_stop = threading.Event()


def agent_enabled() -> bool:
    return os.environ.get(AGENT_ENV) == "1"


def reconcile_before_consuming(**kwargs) -> None:
    # Runs before the worker takes any task, so a requeued load can never race a running one.
    if not agent_enabled():
        return
    result = node_reconcile(node_name=settings.PORTEN_NODE_NAME)
    logger.info("node %s reconciled: %s", settings.PORTEN_NODE_NAME, result)
    close_old_connections()


def start_loops(**kwargs) -> None:
    if not agent_enabled():
        return
    _stop.clear()
    threading.Thread(target=_loop, name="porten-node-agent", daemon=True).start()


def stop_loops(**kwargs) -> None:
    _stop.set()


def _loop() -> None:
    name = settings.PORTEN_NODE_NAME
    since_heartbeat = settings.PORTEN_HEARTBEAT_S
    while not _stop.wait(settings.PORTEN_SUPERVISE_S):
        try:
            node_supervise(node_name=name)
            since_heartbeat += settings.PORTEN_SUPERVISE_S
            if since_heartbeat >= settings.PORTEN_HEARTBEAT_S:
                node_heartbeat(name=name)
                since_heartbeat = 0.0
        except Exception:
            logger.exception("node agent loop error")
        finally:
            close_old_connections()

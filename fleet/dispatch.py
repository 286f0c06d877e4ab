"""Work sent to a node's own queue (`node.<name>`), by task name: the hub never imports the agent."""
from __future__ import annotations

from porten.celery import app, node_queue

LOAD_TASK = "fleet.agent.tasks.load_instance"
UNLOAD_TASK = "fleet.agent.tasks.unload_instance"


def instance_enqueue_load(instance) -> None:
    app.send_task(LOAD_TASK, args=[instance.pk], queue=node_queue(instance.node.name))


def instance_enqueue_unload(instance) -> None:
    app.send_task(UNLOAD_TASK, args=[instance.pk], queue=node_queue(instance.node.name))

"""manage.py node_worker: this machine's Celery worker on its own queue, running the node agent."""
from __future__ import annotations

import os
import shutil
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from fleet.agent.services import node_name_taken
from fleet.agent.worker import AGENT_ENV
from porten.celery import node_queue


class Command(BaseCommand):
    help = "Run this node's Celery worker (queue node.<PORTEN_NODE_NAME>) with the node agent."

    def add_arguments(self, parser):
        parser.add_argument("--hub", action="store_true", help="also take hub-wide tasks (one-machine set-up)")
        parser.add_argument("--concurrency", type=int, default=8)
        parser.add_argument("--loglevel", default="INFO")

    def handle(self, *args, hub: bool, concurrency: int, loglevel: str, **options):
        name = settings.PORTEN_NODE_NAME
        if (taken := node_name_taken(name=name)) is not None:
            raise CommandError(taken)
        queues = [node_queue(name)] + (["hub"] if hub else [])
        celery = shutil.which("celery", path=os.path.dirname(sys.executable)) or "celery"
        os.environ[AGENT_ENV] = "1"
        # Threads, not processes: engines are children of the agent, and loads mostly wait on I/O.
        argv = [celery, "-A", "porten", "worker", "-Q", ",".join(queues), "-n", f"{name}@%h",
                "--pool", "threads", "--concurrency", str(concurrency), "--loglevel", loglevel,
                "--without-gossip", "--without-mingle", "-E"]  # -E: task events for Flower
        self.stdout.write(f"porten: node {name} worker on {', '.join(queues)}")
        self.stdout.flush()
        os.execv(celery, argv)

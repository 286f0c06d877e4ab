"""manage.py wait_for_node: wait until this machine's node is online (used by `make run`, so that it
says Porten is up only once a cold request can be placed: before the node's first heartbeat, the
planner sees no node at all and answers 503 no_capacity)."""
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from fleet.models import Node
from fleet.placement import node_online


class Command(BaseCommand):
    help = "Wait until this node (PORTEN_NODE_NAME) sends heartbeats; fail after --timeout seconds."

    def add_arguments(self, parser):
        parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")

    def handle(self, *args, timeout: float, **options):
        name = settings.PORTEN_NODE_NAME
        deadline = time.monotonic() + timeout
        while True:
            node = Node.objects.filter(name=name).first()
            if node is not None and node_online(node):
                return
            if time.monotonic() >= deadline:
                raise CommandError(f"node {name} sent no heartbeat within {timeout:g} s")
            time.sleep(0.5)

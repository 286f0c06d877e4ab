"""manage.py drain_node NAME: no new placements on a node; its models move when next requested."""
import time

from django.core.management.base import BaseCommand, CommandError

from fleet.models import RESIDENT_PHASES, Instance
from fleet.services import UnknownNode, node_set_draining


class Command(BaseCommand):
    help = "Drain a node (or --undo it). With --wait, wait until nothing is loaded on it any more."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--undo", action="store_true", help="take placements on the node again")
        parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                            help="wait up to this long for the node to empty (exit 1 if it does not)")

    def handle(self, *args, name: str, undo: bool, wait: float, **options):
        try:
            node_set_draining(name=name, draining=not undo)
        except UnknownNode as exc:
            raise CommandError(str(exc)) from exc
        if undo:
            self.stdout.write(f"porten: node {name} takes placements again")
            return
        self.stdout.write(f"porten: node {name} is draining")
        deadline = time.monotonic() + wait
        while wait:
            left = Instance.objects.filter(node__name=name, phase__in=RESIDENT_PHASES).count()
            if left == 0:
                self.stdout.write(f"porten: node {name} is empty; it can leave")
                return
            if time.monotonic() >= deadline:
                raise CommandError(f"node {name} still holds {left} instance(s) after {wait:g} s")
            time.sleep(0.5)

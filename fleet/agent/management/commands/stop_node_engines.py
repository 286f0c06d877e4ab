"""manage.py stop_node_engines: stop every engine this node started (used when `make run` exits)."""
from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils import timezone

from fleet.agent.engines.process import stop_all_engines
from fleet.models import Instance, Phase


class Command(BaseCommand):
    help = "Stop all engine processes of this node and mark their instances stopped."

    def handle(self, *args, **options):
        name = settings.PORTEN_NODE_NAME
        stopped = stop_all_engines(name)
        Instance.objects.filter(node__name=name, phase__in=[
            Phase.QUEUED, Phase.DOWNLOADING, Phase.LOADING, Phase.READY, Phase.DRAINING, Phase.UNLOADING,
        ]).update(phase=Phase.STOPPED, stopped_at=timezone.now())
        self.stdout.write(f"porten: stopped {len(stopped)} engine(s) of node {name}")

"""manage.py nodes: the fleet's nodes as the hub sees them (online, draining, memory, instances)."""
from django.core.management.base import BaseCommand

from fleet.models import RESIDENT_PHASES, Node


class Command(BaseCommand):
    help = "List the fleet's nodes: address, online or not, draining, free/total memory, instances."

    def handle(self, *args, **options):
        rows = [("NODE", "ADDRESS", "STATE", "MEMORY FREE/TOTAL MB", "INSTANCES", "LAST HEARTBEAT")]
        for node in Node.objects.order_by("name"):
            state = ("online" if node.online else "offline") + (", draining" if node.draining else "")
            instances = node.instances.filter(phase__in=RESIDENT_PHASES)
            listed = ", ".join(f"{i.model.model_id}:{i.phase}" for i in instances.select_related("model")) or "-"
            seen = node.last_heartbeat_at.strftime("%Y-%m-%d %H:%M:%S") if node.last_heartbeat_at else "never"
            rows.append((node.name, node.address, state, f"{node.memory_free_mb}/{node.memory_total_mb}", listed, seen))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

"""The node agent as a Django app: its tasks are discovered, its worker signals connected here."""
from django.apps import AppConfig


class AgentConfig(AppConfig):
    name = "fleet.agent"
    label = "fleet_agent"
    verbose_name = "Node agent"

    def ready(self) -> None:
        from celery.signals import worker_init, worker_ready, worker_shutdown

        from .worker import reconcile_before_consuming, start_loops, stop_loops

        worker_init.connect(reconcile_before_consuming, weak=False)
        worker_ready.connect(start_loops, weak=False)
        worker_shutdown.connect(stop_loops, weak=False)

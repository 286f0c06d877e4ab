"""The fleet: nodes, instances, the node agent, the planner and the /v1 gateway."""
from django.apps import AppConfig


class FleetConfig(AppConfig):
    name = "fleet"
    verbose_name = "Fleet"

"""Porten's own app: API keys, errors, health."""
from django.apps import AppConfig


class PortenConfig(AppConfig):
    name = "porten"
    verbose_name = "Porten"

    def ready(self) -> None:
        from . import openapi  # noqa: F401  (registers the API-key scheme with drf-spectacular)

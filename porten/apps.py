"""Porten's own app: API keys, errors, health."""
from django.apps import AppConfig


class PortenConfig(AppConfig):
    name = "porten"
    verbose_name = "Porten"

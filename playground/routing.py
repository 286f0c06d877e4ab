"""Websocket routes of the playground (porten/asgi.py wraps them in auth and origin checks)."""
from django.urls import re_path

from .consumers import FleetConsumer, WarmingConsumer

websocket_urlpatterns = [
    # Model ids are slugs with dots (catalog.models.MODEL_ID_PATTERN); the consumer refuses unknown ones.
    re_path(r"^ws/warming/(?P<model_id>[^/]+)/$", WarmingConsumer.as_asgi()),
    re_path(r"^ws/fleet/$", FleetConsumer.as_asgi()),  # staff only; the consumer refuses others
]

"""Porten: a hub that serves a fleet of open LLMs on demand."""
from .celery import app as celery_app

__all__ = ["celery_app"]

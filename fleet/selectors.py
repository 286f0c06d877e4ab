"""Reads of fleet state."""
from __future__ import annotations

from .models import Instance, Phase


def ready_model_ids() -> set[str]:
    return set(Instance.objects.filter(phase=Phase.READY).values_list("model__model_id", flat=True))

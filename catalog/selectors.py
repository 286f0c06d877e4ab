"""Reads of the catalog."""
from __future__ import annotations

from django.db.models import QuerySet

from .models import CatalogModel


def offered_models() -> QuerySet[CatalogModel]:
    return CatalogModel.objects.filter(enabled=True).order_by("model_id")


def offered_model(model_id: str) -> CatalogModel | None:
    return offered_models().filter(model_id=model_id).first()


async def offered_model_aget(model_id: str) -> CatalogModel | None:
    if not isinstance(model_id, str) or not model_id:
        return None
    return await offered_models().filter(model_id=model_id).afirst()

"""Reads of the catalog."""
from __future__ import annotations

from django.db.models import QuerySet

from porten.cache import Cache

from .models import CatalogModel


def offered_models() -> QuerySet[CatalogModel]:
    return CatalogModel.objects.filter(enabled=True).order_by("model_id")


def offered_model(model_id: str) -> CatalogModel | None:
    """The offered model with this id or alias."""
    model = offered_models().filter(model_id=model_id).first()
    if model is None:
        model = next((m for m in offered_models().exclude(aliases=[]) if model_id in m.aliases), None)
    return model


OFFERED_TTL_S = 2.0  # enabling or disabling a model reaches every hub process within this long (and a query)


async def _offered_lookup(model_id: str) -> CatalogModel | None:
    model = await offered_models().filter(model_id=model_id).afirst()
    if model is None:
        # Aliases are few and a JSON list: matched here rather than by a lookup SQLite lacks.
        async for candidate in offered_models().exclude(aliases=[]):
            if model_id in candidate.aliases:
                return candidate
    return model


_offered: Cache[str, CatalogModel] = Cache("offered-model", _offered_lookup, ttl_s=OFFERED_TTL_S)


async def offered_model_aget(model_id: str) -> CatalogModel | None:
    """The offered model with this id or alias, remembered briefly: the gateway asks for it on every request."""
    if not isinstance(model_id, str) or not model_id or len(model_id) > 100:
        return None
    return await _offered.get(model_id)

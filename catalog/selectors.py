"""Reads of the catalog."""
from __future__ import annotations

import time

from django.db.models import QuerySet

from porten.refresh import look_up_once, usable

from .models import CatalogModel


def offered_models() -> QuerySet[CatalogModel]:
    return CatalogModel.objects.filter(enabled=True).order_by("model_id")


def offered_model(model_id: str) -> CatalogModel | None:
    return offered_models().filter(model_id=model_id).first()


_OFFERED_TTL_S = 2.0  # enabling or disabling a model reaches every hub process within this long (and a query)
_offered_cache: dict[str, tuple[float, CatalogModel | None]] = {}


async def offered_model_aget(model_id: str) -> CatalogModel | None:
    """The offered model with this id, remembered briefly: the gateway asks for it on every request.
    An offered model just past its time is answered at once while one task looks again
    (porten.refresh); an id that was not offered is looked up again before it is answered."""
    if not isinstance(model_id, str) or not model_id or len(model_id) > 100:
        return None
    hit = _offered_cache.get(model_id)
    if hit is not None and usable(("offered", model_id), hit[1], time.monotonic() - hit[0], _offered_lookup, model_id):
        return hit[1]
    return await look_up_once(("offered", model_id), _offered_lookup, model_id)


async def _offered_lookup(model_id: str) -> CatalogModel | None:
    now = time.monotonic()
    model = await offered_models().filter(model_id=model_id).afirst()
    if len(_offered_cache) > 10_000:
        _offered_cache.clear()
    _offered_cache[model_id] = (now + _OFFERED_TTL_S, model)
    return model

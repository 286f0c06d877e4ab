"""Writes to the catalog."""
from __future__ import annotations

from typing import Any, Iterable

from django.db import transaction

from .models import CatalogModel


@transaction.atomic
def catalog_model_create(**fields: Any) -> CatalogModel:
    model = CatalogModel(**fields)
    model.full_clean()
    model.save()
    return model


@transaction.atomic
def catalog_model_update(*, model: CatalogModel, **fields: Any) -> CatalogModel:
    for name, value in fields.items():
        setattr(model, name, value)
    model.full_clean()
    model.save()
    return model


@transaction.atomic
def catalog_models_set_enabled(*, ids: Iterable[int], enabled: bool) -> int:
    return CatalogModel.objects.filter(pk__in=list(ids)).update(enabled=enabled)


@transaction.atomic
def catalog_models_set_pinned(*, ids: Iterable[int], pinned: bool) -> int:
    return CatalogModel.objects.filter(pk__in=list(ids)).update(pinned=pinned)

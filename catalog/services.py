"""Writes to the catalog."""
from __future__ import annotations

from typing import Any, Iterable

from django.db import transaction

from fleet.models import RESIDENT_PHASES

from .models import CatalogModel


class ModelInUse(Exception):
    pass


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


@transaction.atomic
def catalog_model_delete(*, model: CatalogModel) -> None:
    """Delete an entry and its instance history; refused while any instance of it holds memory."""
    live = model.instances.filter(phase__in=RESIDENT_PHASES).select_related("node")
    if live.exists():
        where = ", ".join(sorted(f"{i.node.name} ({i.phase})" for i in live))
        raise ModelInUse(f"'{model.model_id}' has live instances on {where}: unload them first.")
    model.instances.all().delete()
    model.delete()

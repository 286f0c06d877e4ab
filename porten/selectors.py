"""Reads for a person's own pages: their keys, the models they may pick, their usage."""
from __future__ import annotations

from dataclasses import dataclass

from django.db.models import QuerySet
from django.utils import timezone

from catalog.models import CatalogModel
from catalog.selectors import offered_models

from .models import AccessPolicy, ApiKey
from .usage import since_days, usage_rows, usage_totals

USAGE_DAYS = 30


def own_keys(*, user) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user=user).order_by("-is_active", "-created_at")


@dataclass(frozen=True)
class OwnKey:
    key: ApiKey
    status: str  # active | expired | revoked


def own_key_rows(*, user) -> list[OwnKey]:
    now = timezone.now()
    return [OwnKey(key=k, status="revoked" if not k.is_active
                   else "expired" if k.expires_at is not None and k.expires_at <= now else "active")
            for k in own_keys(user=user)]


def own_key(*, user, key_id: int) -> ApiKey | None:
    """One of the person's keys; someone else's is None, as if it did not exist."""
    return ApiKey.objects.filter(user=user, pk=key_id).first()


def models_allowed(*, policy: AccessPolicy) -> list[CatalogModel]:
    """The offered models a policy lets its person pick (all of them when it names none)."""
    allowed = set(policy.allowed_models)
    return [m for m in offered_models() if not allowed or m.model_id in allowed]


@dataclass(frozen=True)
class OwnUsage:
    days: int
    rows: list[dict]  # per day and model, newest day first: day, model_id, requests, prompt_tokens, completion_tokens
    by_model: list[dict]  # per model over the whole window
    total: dict  # requests, prompt_tokens, completion_tokens


def _plain(row: dict) -> dict:
    out = {k: v for k, v in row.items() if not k.endswith("_sum")}
    for name in ("requests", "prompt_tokens", "completion_tokens"):
        out[name] = row[f"{name}_sum"] or 0
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def own_usage(*, user, days: int = USAGE_DAYS) -> OwnUsage:
    """A person's usage (their keys and their playground sessions) over the last `days` days."""
    rows = usage_rows(user=user, since=since_days(days))
    per_day = [_plain(r) for r in usage_totals(rows, by=("day", "model_id"))]
    per_day.sort(key=lambda r: r["day"], reverse=True)  # stable: models stay in name order within a day
    by_model = [_plain(r) for r in usage_totals(rows, by=("model_id",))]
    total = {name: sum(r[name] for r in by_model)
             for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
    return OwnUsage(days=days, rows=per_day, by_model=by_model, total=total)

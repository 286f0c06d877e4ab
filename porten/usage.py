"""Usage records: Redis holds what the hub processes tallied since the last move; `usage_persist`
moves it into UsageRecord rows (beat, every few seconds). Reads for the admin, the API and a
person's own page."""
from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone as dt_timezone

from django.db import transaction
from django.db.models import F, QuerySet, Sum
from django.db.models.functions import TruncDay

from .models import ApiKey, UsageRecord
from .redis import redis_client

logger = logging.getLogger(__name__)

PENDING_KEY = "porten:usage:pending"
MOVING_PREFIX = "porten:usage:moving:"
FIELD_NAMES = {"r": "requests", "p": "prompt_tokens", "c": "completion_tokens"}


def usage_field(hour: int, key_id: int | None, user_id: int | None, model_id: str, kind: str) -> str:
    return f"{hour}|{key_id or ''}|{user_id or ''}|{model_id}|{kind}"


def usage_persist() -> int:
    """Move tallied usage from Redis into the database; returns the rows written. A move cut off
    by a crash is picked up by the next run (its hash is renamed first, deleted after commit)."""
    client = redis_client()
    moving = f"{MOVING_PREFIX}{uuid.uuid4().hex}"
    try:
        client.rename(PENDING_KEY, moving)
    except Exception as exc:  # no such key: nothing new
        if "no such key" not in str(exc).lower():
            raise
    written = 0
    for name in client.scan_iter(match=f"{MOVING_PREFIX}*"):
        written += _write(client.hgetall(name))
        client.delete(name)
    return written


def _write(fields: dict) -> int:
    rows: dict[tuple, dict[str, int]] = defaultdict(lambda: {"requests": 0, "prompt_tokens": 0,
                                                             "completion_tokens": 0})
    for raw_name, raw_amount in fields.items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
        hour, key_id, user_id, model_id, kind = name.split("|", 4)
        if kind not in FIELD_NAMES:
            continue
        rows[(int(hour), int(key_id) if key_id else None, int(user_id) if user_id else None, model_id)][
            FIELD_NAMES[kind]] += int(raw_amount)
    known_keys = set(ApiKey.objects.filter(pk__in={k[1] for k in rows if k[1]}).values_list("pk", flat=True))
    with transaction.atomic():
        for (hour, key_id, user_id, model_id), amounts in rows.items():
            when = datetime.fromtimestamp(hour, tz=dt_timezone.utc)
            key_id = key_id if key_id in known_keys else None
            updated = UsageRecord.objects.filter(hour=when, api_key_id=key_id, user_id=user_id,
                                                 model_id=model_id).update(
                **{name: F(name) + amount for name, amount in amounts.items()})
            if not updated:
                UsageRecord.objects.create(hour=when, api_key_id=key_id, user_id=user_id, model_id=model_id, **amounts)
    return len(rows)


def usage_rows(*, since: datetime | None = None, api_key: ApiKey | None = None, user=None,
               model_id: str | None = None) -> QuerySet[UsageRecord]:
    rows = UsageRecord.objects.all()
    if since is not None:
        rows = rows.filter(hour__gte=since)
    if api_key is not None:
        rows = rows.filter(api_key=api_key)
    if user is not None:
        rows = rows.filter(user=user)
    if model_id:
        rows = rows.filter(model_id=model_id)
    return rows


def usage_totals(rows: QuerySet[UsageRecord], *, by: tuple[str, ...]) -> list[dict]:
    """Sums of requests and tokens grouped by `by` (fields of UsageRecord, or "day")."""
    if "day" in by:
        rows = rows.annotate(day=TruncDay("hour"))
    return list(rows.values(*by).annotate(
        requests_sum=Sum("requests"), prompt_tokens_sum=Sum("prompt_tokens"),
        completion_tokens_sum=Sum("completion_tokens")).order_by(*by))


def since_days(days: int) -> datetime:
    return datetime.now(tz=dt_timezone.utc) - timedelta(days=days)

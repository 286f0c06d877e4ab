"""Demand per model: served and unmet requests over a sliding window, in Redis so every hub
process sees the same numbers. Served requests are tallied and written in batches (fleet.inflight);
an unmet request's count is in Redis before its request asks the planner, and the unmet requests
that arrive together share a pipelined round trip."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

from django.conf import settings

from porten.loops import per_loop
from porten.redis import aredis_client, redis_client

from .planner import recency_weight

BUCKET_S = 60  # the window slides by minute buckets


def _bucket_key(kind: str, model_id: str, bucket: int) -> str:
    return f"porten:demand:{kind}:{model_id}:{bucket}"


def last_request_key(model_id: str) -> str:
    return f"porten:last-request:{model_id}"


def _window_buckets(now: float, window_s: float) -> list[int]:
    current = int(now // BUCKET_S)
    count = max(1, int(-(-window_s // BUCKET_S)))
    return list(range(current - count + 1, current + 1))


def demand_commands(pipe, model_id: str, *, served: bool, now: float | None = None, count: int = 1) -> None:
    """Queue the commands that count requests on a Redis pipeline (callers batch them)."""
    now = time.time() if now is None else now
    key = _bucket_key("served" if served else "unmet", model_id, int(now // BUCKET_S))
    pipe.incrby(key, count)
    pipe.expire(key, int(settings.PORTEN_DEMAND_WINDOW_S) + 2 * BUCKET_S)
    pipe.set(last_request_key(model_id), now)


class DemandBatches:
    """One event loop's requests on their way to Redis. A call joins the batch being gathered and
    returns once that batch is written: while one batch is being written the next gathers, so a
    burst of a thousand cold requests costs a few round trips and connections, not one each (one
    each ran the connection pool dry, and the counts past its 100 connections were lost). A call
    that is cancelled still counts: its request happened."""

    def __init__(self) -> None:
        self.pending: Counter[tuple[str, bool]] = Counter()
        self.pending_written: asyncio.Future | None = None
        self.writer: asyncio.Task | None = None

    async def record(self, model_id: str, served: bool) -> None:
        loop = asyncio.get_running_loop()
        self.pending[(model_id, served)] += 1
        if self.pending_written is None:
            self.pending_written = loop.create_future()
        written = self.pending_written
        if self.writer is None or self.writer.done():
            self.writer = loop.create_task(self._write_all(), name="porten-demand")
        await asyncio.shield(written)

    async def _write_all(self) -> None:
        while self.pending:
            counts, self.pending = self.pending, Counter()
            written, self.pending_written = self.pending_written, None
            try:
                pipe = aredis_client().pipeline(transaction=False)
                now = time.time()
                for (model_id, served), count in counts.items():
                    demand_commands(pipe, model_id, served=served, now=now, count=count)
                await pipe.execute()
            except BaseException as exc:
                # The callers hear of it (and log it); a cancelled writer must not leave them waiting.
                written.set_exception(exc if isinstance(exc, Exception) else RuntimeError("demand writer stopped"))
                if not isinstance(exc, Exception):
                    raise
            else:
                written.set_result(None)


async def demand_record(model_id: str, *, served: bool) -> None:
    """Count one request; returns once the count is in Redis (raises if it could not be written)."""
    await per_loop(DemandBatches).record(model_id, served)


def _bucket_counts(model_ids: list[str], window_s: float, now: float) -> tuple[list[int], dict[str, list[int]]]:
    """The window's minute buckets, and per model its requests (served + unmet) in each."""
    buckets = _window_buckets(now, window_s)
    keys = [_bucket_key(kind, m, b) for m in model_ids for b in buckets for kind in ("served", "unmet")]
    values = [int(v) if v else 0 for v in redis_client().mget(keys)]
    counts = {}
    for i, model_id in enumerate(model_ids):
        row = values[i * 2 * len(buckets):(i + 1) * 2 * len(buckets)]
        counts[model_id] = [row[2 * j] + row[2 * j + 1] for j in range(len(buckets))]
    return buckets, counts


def demand_counts(model_ids: list[str], *, window_s: float | None = None, now: float | None = None) -> dict[str, float]:
    """Requests (served + unmet) per model over the window."""
    if not model_ids:
        return {}
    now = time.time() if now is None else now
    window_s = settings.PORTEN_DEMAND_WINDOW_S if window_s is None else window_s
    _, counts = _bucket_counts(model_ids, window_s, now)
    return {model_id: float(sum(row)) for model_id, row in counts.items()}


def demand_recent(model_ids: list[str], *, now: float | None = None) -> dict[str, float]:
    """What the planner compares: requests per model over the demand window, each weighted by how
    recent it is (`planner.recency_weight`, taken at the middle of its minute bucket)."""
    if not model_ids:
        return {}
    now = time.time() if now is None else now
    window_s = settings.PORTEN_DEMAND_WINDOW_S
    buckets, counts = _bucket_counts(model_ids, window_s, now)
    weights = [recency_weight(now - min(now, (b + 0.5) * BUCKET_S), window_s) for b in buckets]
    return {model_id: sum(c * w for c, w in zip(row, weights)) for model_id, row in counts.items()}


def last_requests(model_ids: list[str]) -> dict[str, float]:
    if not model_ids:
        return {}
    values = redis_client().mget([last_request_key(m) for m in model_ids])
    return {m: float(v) for m, v in zip(model_ids, values) if v}

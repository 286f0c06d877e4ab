"""The hub's Prometheus metrics: per-request figures kept in each hub process (summed across processes
through PROMETHEUS_MULTIPROC_DIR), and GET /metrics, which adds the fleet's (fleet.metrics)."""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from fleet.metrics import FleetCollector

from .errors import error_response

# Set for the hub's uvicorn processes by scripts/run.sh (emptied before they start): every process
# writes its values there, and a scrape answered by any of them sums them all. Unset (one process,
# `manage.py runserver`, tests in process): the values live in this process only.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
if MULTIPROC_DIR:
    os.makedirs(MULTIPROC_DIR, exist_ok=True)

NO_MODEL = ""  # the model label of a request refused before its model was known (no key, bad JSON, unknown model)

# Seconds, from a warm answer of a few tokens to a cold load near the warm-up budget.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

HUB = CollectorRegistry()

REQUESTS = Counter(
    "porten_requests", "Requests to /v1/chat/completions, /v1/completions and /v1/embeddings, by model, the HTTP "
    "status sent (499: the client left first) and whether they waited for a load (cold).",
    ("model", "status", "cold"), registry=HUB)
REQUEST_SECONDS = Histogram(
    "porten_request_duration_seconds", "Arrival to the last byte of the answer.", ("model", "cold"),
    buckets=LATENCY_BUCKETS, registry=HUB)
FIRST_TOKEN_SECONDS = Histogram(
    "porten_time_to_first_token_seconds", "Streamed answers: arrival to the engine's first event.",
    ("model", "cold"), buckets=LATENCY_BUCKETS, registry=HUB)
QUEUE_SECONDS = Histogram(
    "porten_engine_queue_seconds", "Time a request waited for one of its engine's slots at this hub process's "
    "gate (X-Porten-Queue-Seconds; 0 when one was free).", ("model",), buckets=QUEUE_BUCKETS, registry=HUB)
TOKENS = Counter(
    "porten_tokens", "Tokens used, from the engines' usage (the usage records' figures), by model and kind "
    "(prompt or completion).", ("model", "kind"), registry=HUB)
RATE_LIMITED = Counter(
    "porten_rate_limited", "Requests refused with 429 by a key's limit, by what ran out (requests, tokens, "
    "concurrent).", ("limit",), registry=HUB)
WAITING_FOR_LOAD = Gauge(
    "porten_requests_waiting_for_load", "Requests waiting now for their model to load.", ("model",),
    multiprocess_mode="livesum", registry=HUB)

_children: dict[tuple, object] = {}  # (metric, label values) -> its child: .labels() costs more than the write


def _child(metric, *labelvalues: str):
    child = _children.get((metric, labelvalues))
    if child is None:
        child = _children[(metric, labelvalues)] = metric.labels(*labelvalues)
    return child


def request_observe(model: str, status: int, cold: bool, seconds: float, first_token_s: float | None) -> None:
    """One answered /v1 request (called by the gateway once its answer is sent)."""
    cold_label = "true" if cold else "false"
    _child(REQUESTS, model, str(status), cold_label).inc()
    _child(REQUEST_SECONDS, model, cold_label).observe(seconds)
    if first_token_s is not None:
        _child(FIRST_TOKEN_SECONDS, model, cold_label).observe(first_token_s)


def tokens_count(model: str, prompt_tokens: int, completion_tokens: int) -> None:
    if prompt_tokens:
        _child(TOKENS, model, "prompt").inc(prompt_tokens)
    if completion_tokens:
        _child(TOKENS, model, "completion").inc(completion_tokens)


def rate_limited_count(limit: str) -> None:
    _child(RATE_LIMITED, limit).inc()


def queue_observe(model: str, seconds: float) -> None:
    _child(QUEUE_SECONDS, model).observe(seconds)


def waiting_for_load(model: str) -> Gauge:
    """The gauge of requests waiting for `model` to load: inc() when one starts, dec() when it ends."""
    return _child(WAITING_FOR_LOAD, model)


# --- hub processes that come and go -------------------------------------------------------------
# uvicorn restarts a worker that died and has no hook for it, so each process leaves a marker, and
# a scrape marks the processes whose marker outlived them dead (their live gauges drop out).

def _marker(pid: int) -> Path:
    return Path(MULTIPROC_DIR) / f"porten-hub-{pid}.pid"


def process_started() -> None:
    if MULTIPROC_DIR:
        _marker(os.getpid()).touch()


def process_stopped() -> None:
    if MULTIPROC_DIR:
        mark_process_dead(os.getpid(), MULTIPROC_DIR)
        _marker(os.getpid()).unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_processes_sweep() -> list[int]:
    """Mark the hub processes that died without saying so dead; returns their pids."""
    swept = []
    for marker in Path(MULTIPROC_DIR).glob("porten-hub-*.pid"):
        pid = int(marker.stem.rpartition("-")[2])
        if not _pid_alive(pid):
            mark_process_dead(pid, MULTIPROC_DIR)
            marker.unlink(missing_ok=True)
            swept.append(pid)
    return swept


# --- GET /metrics ---------------------------------------------------------------------------------

def metrics_text() -> bytes:
    """The Prometheus text of every hub process and of the fleet."""
    registry = CollectorRegistry()
    if MULTIPROC_DIR:
        dead_processes_sweep()
        MultiProcessCollector(registry, MULTIPROC_DIR)
    else:
        registry.register(HUB)
    registry.register(FleetCollector())
    try:
        return generate_latest(registry)
    finally:
        connection.close()  # this runs in a pool thread, where no request_finished closes it


def _authorized(request) -> bool:
    token = settings.PORTEN_METRICS_TOKEN
    if not token:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


async def metrics(request) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        return error_response(405, f"{request.method} is not allowed here; use GET.", type="invalid_request_error",
                              code="method_not_allowed", headers={"Allow": "GET, HEAD"})
    if not _authorized(request):
        return error_response(401, "Send the metrics token: 'Authorization: Bearer <PORTEN_METRICS_TOKEN>'.",
                              type="invalid_request_error", code="invalid_metrics_token",
                              headers={"WWW-Authenticate": "Bearer"})
    body = await sync_to_async(metrics_text, thread_sensitive=False)()
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)

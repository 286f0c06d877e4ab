"""The /v1 gateway's work: find or warm a model's engine within the request's budget, then proxy."""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpResponse
from django.utils import timezone

from catalog.models import CatalogModel
from porten.errors import error_response
from porten.gateway_handler import PassThroughStream
from porten.refresh import look_up_once, usable

from .demand import demand_record
from .events import model_events
from .inflight import tally
from .live import warming_state
from .models import ACTIVE_PHASES, Instance, Phase
from .placement import PlacementError, instance_ensure, node_online, node_stale_s
from .upstream import EngineClient

logger = logging.getLogger(__name__)

DEFAULT_LOAD_S = 15.0
DEFAULT_DOWNLOAD_S = 30.0
ROUTE_TTL_S = 1.0
BUSY_RETRY_S = 2.0  # how often a request that could not be placed asks the planner again


@dataclass(frozen=True)
class Route:
    instance_id: int
    base_url: str
    cold: bool = False
    load_seconds: float | None = None


class WarmupFailed(Exception):
    def __init__(self, response: HttpResponse) -> None:
        self.response = response


# --- upstream client and route cache, one per event loop ---------------------------------------

_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EngineClient]" = weakref.WeakKeyDictionary()
_routes: dict[str, tuple[float, Route]] = {}


def upstream_client() -> EngineClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = EngineClient(timeout=httpx.Timeout(settings.PORTEN_UPSTREAM_TIMEOUT_S, connect=5.0))
        _clients[loop] = client
    return client


def _route_for(instance: Instance, *, cold: bool = False) -> Route:
    load_s = None
    if cold and instance.ready_at and instance.created_at:
        load_s = round((instance.ready_at - instance.created_at).total_seconds(), 3)
    return Route(instance.pk, f"http://{instance.node.address}:{instance.port}", cold=cold, load_seconds=load_s)


_route_locks: dict[str, asyncio.Lock] = {}


async def ready_route(model: CatalogModel, *, use_cache: bool = True, max_age_s: float = ROUTE_TTL_S) -> Route | None:
    """The ready engine for this model, from a per-process cache. A ready engine found just past
    `max_age_s` is answered at once while one task looks again (porten.refresh). With none cached,
    one query at a time refreshes it, and everyone who asked meanwhile reuses the answer."""
    cached = _routes.get(model.model_id)
    if use_cache and cached and usable(("route", model.model_id), cached[1], time.monotonic() - cached[0] - max_age_s,
                                       _route_lookup, model):
        return cached[1]
    return await _route_lookup(model)


async def _route_lookup(model: CatalogModel) -> Route | None:
    lock = _route_locks.setdefault(model.model_id, asyncio.Lock())
    asked_at = time.monotonic()
    async with lock:
        cached = _routes.get(model.model_id)
        if cached and cached[0] >= asked_at:
            return cached[1]  # refreshed by someone else while we queued
        instance = await Instance.objects.filter(
            model=model, phase=Phase.READY,
            node__last_heartbeat_at__gte=timezone.now() - timedelta(seconds=node_stale_s()),
        ).select_related("node").afirst()
        route = _route_for(instance) if instance is not None else None
        _routes[model.model_id] = (time.monotonic(), route)
        return route


def forget_route(model_id: str) -> None:
    _routes.pop(model_id, None)
    _active_cache.pop(model_id, None)


# --- warming ----------------------------------------------------------------------------------

_active_cache: dict[str, tuple[float, Instance | None]] = {}


async def _active(model: CatalogModel, max_age_s: float = 0.2) -> Instance | None:
    """The model's live instance; like ready_route, one query serves every waiter that asks at once."""
    cached = _active_cache.get(model.model_id)
    if cached and time.monotonic() - cached[0] < max_age_s:
        return cached[1]
    lock = _route_locks.setdefault("active:" + model.model_id, asyncio.Lock())
    asked_at = time.monotonic()
    async with lock:
        cached = _active_cache.get(model.model_id)
        if cached and cached[0] >= asked_at:
            return cached[1]
        instance = await Instance.objects.filter(model=model, phase__in=ACTIVE_PHASES).select_related("node").afirst()
        _active_cache[model.model_id] = (time.monotonic(), instance)
        return instance


def _placed_or_refused(model: CatalogModel) -> Instance | PlacementError:
    # A refusal is an answer, not a failure: returned, so the shared lookup does not log it.
    try:
        return instance_ensure(model=model)
    except PlacementError as exc:
        return exc


async def _ensure(model: CatalogModel) -> Instance:
    """instance_ensure (one load across every hub process), asked once at a time per model in this
    process (look_up_once): the waiters that find no instance together share one call. A burst of
    1,000 cold requests made 294 calls, each a thread and database queries fighting the event loop
    for the GIL, until the first one's answer got through."""
    outcome = await look_up_once(("ensure", model.model_id),
                                 sync_to_async(_placed_or_refused, thread_sensitive=False), model)
    if isinstance(outcome, PlacementError):
        raise PlacementError(outcome.code, outcome.reason)  # each waiter its own: one raised by all grows its traceback
    _active_cache[model.model_id] = (time.monotonic(), outcome)
    return outcome


def retry_after_s(instance: Instance | None, state: dict | None, past_load_s: float | None) -> int:
    """Seconds until the model should be ready: bytes left at the measured rate, plus its past load time."""
    load_s = past_load_s or DEFAULT_LOAD_S
    if instance is None:
        return math.ceil(DEFAULT_DOWNLOAD_S + load_s)
    phase = instance.phase
    if phase == Phase.LOADING:
        elapsed = time.time() - instance.updated_at.timestamp()
        return max(1, math.ceil(load_s - elapsed))
    if phase == Phase.DOWNLOADING:
        done = (state or {}).get("bytes_done", instance.bytes_done)
        total = (state or {}).get("bytes_total", instance.bytes_total)
        rate = (state or {}).get("rate_mbps", 0) * 1_000_000 or instance.download_rate_bps
        download_s = (total - done) / rate if rate > 0 and total else DEFAULT_DOWNLOAD_S
        return max(1, math.ceil(download_s + load_s))
    return max(1, math.ceil(DEFAULT_DOWNLOAD_S + load_s))


async def _past_load_s(model: CatalogModel) -> float | None:
    return await Instance.objects.filter(model=model, load_seconds__isnull=False).order_by("-ready_at").values_list(
        "load_seconds", flat=True).afirst()


def _state_of(instance: Instance | None, model_id: str, live: dict | None) -> dict:
    if instance is None:
        return warming_state(model_id=model_id, phase="idle", instance_id=None)
    if live and live.get("instance") == instance.pk and live.get("phase") == instance.phase:
        return live
    return warming_state(model_id=model_id, phase=instance.phase, instance_id=instance.pk,
                         bytes_done=instance.bytes_done, bytes_total=instance.bytes_total,
                         rate_bps=instance.download_rate_bps, error=instance.last_error)


async def warm_route(model: CatalogModel, *, budget_s: float) -> Route:
    """Wait (as a coroutine, no thread held) until the model has a ready engine, placing a load if
    nobody has. Raises WarmupFailed with the error response for no capacity, a failed load, or a
    budget that ran out (the load goes on)."""
    deadline = time.monotonic() + budget_s
    events = model_events()
    watched: Instance | None = None
    aged_at = time.monotonic()
    while True:
        future = await events.watch(model.model_id)
        try:
            active = await _warm_step(model, watched)
        except BaseException:
            events.discard(model.model_id, future)
            raise
        if isinstance(active, Route):
            events.discard(model.model_id, future)
            return active
        busy = active if isinstance(active, PlacementError) else None
        watched = None if busy else active
        if busy is not None and time.monotonic() - aged_at >= settings.PORTEN_BUSY_AGING_S:
            # Aging: a request kept waiting for room counts once more per interval, so a model
            # refused as busy wins its place in bounded time instead of starving behind busier ones.
            aged_at = time.monotonic()
            await record_demand(model.model_id, served=False)
        remaining = deadline - time.monotonic()
        if remaining <= 0 and busy is not None:
            events.discard(model.model_id, future)
            raise WarmupFailed(error_response(503, busy.reason, type="server_error", code=busy.code,
                                              headers={"Retry-After": "30"}))
        if remaining <= 0:
            events.discard(model.model_id, future)
            live = events.latest.get(model.model_id)
            state = _state_of(active, model.model_id, live)
            retry = retry_after_s(active, live, await _past_load_s(model))
            raise WarmupFailed(error_response(
                503, f"{model.model_id} is warming up ({state['phase']}, {state['pct']}%); retry in about {retry} s.",
                type="server_error", code="model_warming", headers={"Retry-After": str(retry)},
                warming={k: state[k] for k in ("model", "ready", "phase", "done_mb", "total_mb", "pct")},
            ))
        # Jitter the fallback re-read so a thousand waiters never poll in lockstep.
        fallback_s = BUSY_RETRY_S if busy else random.uniform(10.0, 20.0)
        await events.wait(model.model_id, future, timeout_s=min(remaining, fallback_s))


async def _warm_step(model: CatalogModel, watched: Instance | None) -> Route | Instance | PlacementError:
    """One look at the truth: a ready route, or the live instance to keep waiting on."""
    # Shared by every waiter in this process: a wake-up of a thousand waiters costs one query.
    route = await ready_route(model, max_age_s=0.2)
    if route is not None:
        instance = await Instance.objects.select_related("node").aget(pk=route.instance_id)
        return _route_for(instance, cold=True)
    active = await _active(model)
    if active is None and watched is not None:
        ended = await Instance.objects.aget(pk=watched.pk)
        if ended.phase == Phase.FAILED:
            first_line = ended.last_error.splitlines()[0] if ended.last_error else "unknown error"
            raise WarmupFailed(error_response(
                503, f"Loading {model.model_id} failed: {first_line}",
                type="server_error", code="model_load_failed", reason=ended.last_error[-2000:],
            ))
    if active is None or not node_online(active.node):
        try:
            active = await _ensure(model)
        except PlacementError as exc:
            if exc.code == "no_capacity":
                raise WarmupFailed(error_response(503, exc.reason, type="server_error", code=exc.code))
            # Busier models hold the memory right now: keep waiting (they may go idle, or this
            # model's demand may grow past theirs) and try again on the next wake-up.
            return exc
    return active


# --- proxying ---------------------------------------------------------------------------------

def _porten_headers(response: HttpResponse, route: Route) -> None:
    response["X-Porten-Cold-Start"] = "true" if route.cold else "false"
    if route.cold and route.load_seconds is not None:
        response["X-Porten-Load-Seconds"] = f"{route.load_seconds:.3f}"


def _engine_gone(model_id: str) -> HttpResponse:
    forget_route(model_id)
    return error_response(502, f"The engine serving {model_id} did not answer; retry the request.",
                          type="server_error", code="engine_unavailable")


class _Accounting:
    """One request in flight on an instance (and, for a warm hit, one served request)."""

    def __init__(self, instance_id: int, served_model_id: str | None) -> None:
        self.instance_id, self.open = instance_id, True
        tally().enter(instance_id, served_model_id)

    def close(self) -> None:
        if self.open:
            self.open = False
            tally().leave(self.instance_id)


class _EngineStream:
    """An engine's streamed answer, passed on as its bytes come (EngineClient asks for no encoding):
    iterated, or pushed to a writer (PassThroughStream). Closing it (also when the client goes
    away and Django cancels us) closes the engine connection, which cancels the generation."""

    def __init__(self, client: EngineClient, upstream: httpx.Response, accounting: _Accounting) -> None:
        self.client, self.upstream, self.accounting = client, upstream, accounting

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self.upstream.stream:
                yield part
        finally:
            await self.aclose()

    async def push(self, write: Callable[[bytes], object]) -> bytes:
        return await self.client.push(self.upstream, write)

    async def aclose(self) -> None:
        try:
            await self.upstream.aclose()
        finally:
            self.accounting.close()


@functools.lru_cache(maxsize=4096)
def _engine_url(base_url: str, path: str) -> httpx.URL:
    # Parsed once per engine and path: httpx parses a str URL again on every call, about 30 % of
    # the time its client layer takes per request (measured with a transport that does nothing).
    return httpx.URL(base_url + path)


async def proxy(route: Route, *, path: str, payload: bytes, stream: bool, model_id: str,
                count_served: bool = False) -> HttpResponse:
    """Forward the caller's (validated) body to the engine as it came. With `count_served`, the
    request also counts as served demand."""
    client = upstream_client()
    request = client.json_request(_engine_url(route.base_url, path), payload)
    accounting = _Accounting(route.instance_id, model_id if count_served else None)
    if not stream:
        try:
            upstream = await client.send(request, stream=True)
            content = await client.read(upstream)
        except httpx.TransportError:
            return _engine_gone(model_id)
        finally:
            accounting.close()
        response = HttpResponse(content, status=upstream.status_code,
                                content_type=client.content_type(upstream, "application/json"))
        response["Content-Length"] = str(len(content))
        _porten_headers(response, route)
        return response

    try:
        upstream = await client.send(request, stream=True)
    except httpx.TransportError:
        accounting.close()
        return _engine_gone(model_id)
    if upstream.status_code != 200:
        content = await upstream.aread()
        await upstream.aclose()
        accounting.close()
        response = HttpResponse(content, status=upstream.status_code,
                                content_type=upstream.headers.get("content-type", "application/json"))
        _porten_headers(response, route)
        return response

    response = PassThroughStream(_EngineStream(client, upstream, accounting), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    _porten_headers(response, route)
    return response


async def model_prewarm(model: CatalogModel) -> None:
    """Start loading a model someone picked in the playground, so the load overlaps with their
    typing. A pick counts as unmet demand, like a cold request. Raises PlacementError when the
    fleet cannot take it."""
    if await _active(model, max_age_s=0) is not None:
        return
    await record_demand(model.model_id, served=False)
    await _ensure(model)


async def record_demand(model_id: str, *, served: bool) -> None:
    try:
        await demand_record(model_id, served=served)
    except Exception:
        # Demand feeds eviction choices; losing one count must never fail a request.
        logger.warning("could not record demand for %s", model_id, exc_info=True)

"""The /v1 gateway's work: find or warm a model's engine within the request's budget, then proxy."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta

import aiohttp
from asgiref.sync import sync_to_async
from redis.exceptions import RedisError
from django.conf import settings
from django.http import HttpResponse
from django.utils import timezone

from catalog.models import CatalogModel
from fleet.demand import demand_record
from fleet.live import WarmingState, instance_state
from fleet.models import ACTIVE_PHASES, Instance, Phase, node_stale_s
from fleet.placement import PlacementError, instance_ensure, node_online
from fleet.services import instance_fail_unreachable
from porten.cache import Cache, once
from porten.errors import error_response
from porten.loops import per_loop
from porten.metrics import queue_observe, waiting_for_load

from .asgi import EventStream
from .engine_client import EngineUnavailable, EngineUnreachable, engine_post, engine_read
from .events import model_events
from .inflight import tally

logger = logging.getLogger(__name__)

DEFAULT_LOAD_S = 15.0
DEFAULT_DOWNLOAD_S = 30.0
ROUTE_TTL_S = 1.0
BUSY_RETRY_S = 2.0  # how often a request that could not be placed asks the planner again


@dataclass(frozen=True)
class Route:
    instance_id: int
    base_url: str
    node: str
    load_seconds: float | None = None  # placement to ready, shown on the answers that waited for it
    cold: bool = False
    node_draining: bool = False  # serves until the model is ready elsewhere
    slots: int = 1  # requests its engine serves at once


class WarmupFailed(Exception):
    def __init__(self, response: HttpResponse) -> None:
        self.response = response


_turns = itertools.count()

# --- per-process caches of the database's answers ------------------------------------------

def _route_for(instance: Instance) -> Route:
    load_s = None
    if instance.ready_at and instance.created_at:
        load_s = round((instance.ready_at - instance.created_at).total_seconds(), 3)
    return Route(instance.pk, f"http://{instance.node.address}:{instance.port}", instance.node.name,
                 load_seconds=load_s, node_draining=instance.node.draining, slots=instance.slots)


async def _ready_lookup(model: CatalogModel) -> tuple[Route, ...] | None:
    """The model's ready replicas on live nodes, those on draining nodes only if there is no other."""
    routes = [_route_for(instance) async for instance in Instance.objects.filter(
        model=model, phase=Phase.READY,
        node__last_heartbeat_at__gte=timezone.now() - timedelta(seconds=node_stale_s()),
    ).select_related("node").order_by("replica")]
    staying = tuple(r for r in routes if not r.node_draining)
    return staying or tuple(routes) or None


async def _active_lookup(model: CatalogModel) -> Instance | None:
    return await Instance.objects.filter(model=model, phase__in=ACTIVE_PHASES, node__draining=False).select_related(
        "node").order_by("replica").afirst()


# Keyed by the model row (equal by primary key): a ready engine is reused for ROUTE_TTL_S, and a
# live instance briefly, so a wake-up of a thousand waiters costs one query.
_routes: Cache[CatalogModel, tuple[Route, ...]] = Cache("ready-routes", _ready_lookup, ttl_s=ROUTE_TTL_S)
_active_instances: Cache[CatalogModel, Instance] = Cache("active-instance", _active_lookup, ttl_s=0.2,
                                                         stale_for_s=0.0)


async def ready_route(model: CatalogModel, *, max_age_s: float | None = None) -> Route | None:
    """The ready replica to send the next request to (from this process's cache, porten.cache):
    the one with the fewest requests in flight from this process, ties taken in turn."""
    routes = await _routes.get(model, max_age_s=max_age_s)
    if not routes:
        return None
    if len(routes) == 1:
        return routes[0]
    counts, turn = tally().inflight, next(_turns)
    return min(enumerate(routes), key=lambda pair: (
        counts.get(pair[1].instance_id, 0), (pair[0] - turn) % len(routes)))[1]


def move_soon(model: CatalogModel) -> None:
    """The model is served from a draining node: place it elsewhere (once per process at a time),
    while the draining node goes on serving it until the new replica is ready."""
    async def move() -> None:
        try:
            await _ensure(model)
        except PlacementError as exc:
            logger.info("%s stays on its draining node for now: %s", model.model_id, exc.reason)

    task = asyncio.get_running_loop().create_task(move(), name="porten-move")
    _moving.add(task)  # held until done: the loop keeps only a weak reference to a task
    task.add_done_callback(_moving.discard)


_moving: set[asyncio.Task] = set()


def forget_route(model: CatalogModel) -> None:
    _routes.forget(model)
    _active_instances.forget(model)


def _placed_or_refused(model: CatalogModel) -> Instance | PlacementError:
    # A refusal is an answer, not a failure: returned, so the shared call does not log it.
    try:
        return instance_ensure(model=model)
    except PlacementError as exc:
        return exc
    except RedisError as exc:
        # Placement takes its lock, and a load its queue, in Redis: none can start while it is away.
        # Waiters keep trying, as when the fleet is busy, until it is back or their budget runs out.
        logger.warning("cannot place %s: Redis does not answer (%s)", model.model_id, exc)
        return PlacementError("fleet_unreachable", f"No load of {model.model_id} can start now: the fleet's queue "
                                                   "(Redis) does not answer. Retry shortly.")


async def _ensure(model: CatalogModel) -> Instance:
    """instance_ensure (one load across every hub process), asked once at a time per model in this
    process: the waiters that find no instance together share one call."""
    outcome = await once("ensure", model.model_id,
                         lambda: sync_to_async(_placed_or_refused, thread_sensitive=False)(model))
    if isinstance(outcome, PlacementError):
        raise PlacementError(outcome.code, outcome.reason)  # each waiter its own: one raised by all grows its traceback
    _active_instances.put(model, outcome)
    return outcome


def retry_after_s(instance: Instance | None, state: WarmingState | None, past_load_s: float | None) -> int:
    """Seconds until the model should be ready: bytes left at the measured rate, plus its past load time."""
    load_s = past_load_s or DEFAULT_LOAD_S
    if instance is None:
        return math.ceil(DEFAULT_DOWNLOAD_S + load_s)
    phase = instance.phase
    if phase == Phase.LOADING:
        elapsed = time.time() - instance.updated_at.timestamp()
        return max(1, math.ceil(load_s - elapsed))
    if phase == Phase.DOWNLOADING:
        live = state if state is not None and state.instance == instance.pk else None
        done = live.bytes_done if live else instance.bytes_done
        total = live.bytes_total if live else instance.bytes_total
        rate = (live.rate_bps if live else 0.0) or instance.download_rate_bps
        download_s = (total - done) / rate if rate > 0 and total else DEFAULT_DOWNLOAD_S
        return max(1, math.ceil(download_s + load_s))
    return max(1, math.ceil(DEFAULT_DOWNLOAD_S + load_s))


async def _past_load_s(model: CatalogModel) -> float | None:
    return await Instance.objects.filter(model=model, load_seconds__isnull=False).order_by("-ready_at").values_list(
        "load_seconds", flat=True).afirst()


def _state_of(instance: Instance | None, model: CatalogModel, live: WarmingState | None) -> WarmingState:
    if instance is None:
        return WarmingState(model=model.model_id)
    if live is not None and live.instance == instance.pk and live.phase == instance.phase:
        return live.public()
    instance.model = model
    return instance_state(instance).public()


async def warm_route(model: CatalogModel, *, budget_s: float) -> Route:
    """Wait (as a coroutine, no thread held) until the model has a ready engine, placing a load if
    nobody has. Raises WarmupFailed with the error response for no capacity, a failed load, or a
    budget that ran out (the load goes on)."""
    waiting = waiting_for_load(model.model_id)
    waiting.inc()
    try:
        return await _warm_route(model, budget_s=budget_s)
    finally:
        waiting.dec()


async def _warm_route(model: CatalogModel, *, budget_s: float) -> Route:
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
            state = _state_of(active, model, live)
            retry = retry_after_s(active, live, await _past_load_s(model))
            shown = state.as_dict()
            raise WarmupFailed(error_response(
                503, f"{model.model_id} is warming up ({state.phase}, {state.pct}%); retry in about {retry} s.",
                type="server_error", code="model_warming", headers={"Retry-After": str(retry)},
                warming={k: shown[k] for k in ("model", "ready", "phase", "done_mb", "total_mb", "pct")},
            ))
        # Jitter the fallback re-read so a thousand waiters never poll in lockstep. Told it is ready
        # but not found ready (a lookup that began before the ready was written answered them):
        # look again shortly.
        latest = events.latest.get(model.model_id)
        if latest is not None and latest.phase == Phase.READY:
            fallback_s = 0.25
        else:
            fallback_s = BUSY_RETRY_S if busy else random.uniform(10.0, 20.0)
        await events.wait(model.model_id, future, timeout_s=min(remaining, fallback_s))


async def _warm_step(model: CatalogModel, watched: Instance | None) -> Route | Instance | PlacementError:
    """One look at the truth: a ready route, or the live instance to keep waiting on."""
    # Looked up afresh on every wake-up (a negative answer from a moment ago may predate the
    # engine's ready), and shared by every waiter in this process: a thousand waiters, one query.
    route = await ready_route(model, max_age_s=0)
    if route is not None:
        return replace(route, cold=True)
    active = await _active_instances.get(model)
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

def _porten_headers(response: HttpResponse, route: Route, queued_s: float = 0.0) -> None:
    response["X-Porten-Cold-Start"] = "true" if route.cold else "false"
    if queued_s:
        response["X-Porten-Queue-Seconds"] = f"{queued_s:.3f}"
    response["X-Porten-Node"] = route.node
    if route.cold and route.load_seconds is not None:
        response["X-Porten-Load-Seconds"] = f"{route.load_seconds:.3f}"


class EngineGone(Exception):
    """The engine could not be reached, or broke off before its answer began."""


def engine_unavailable(model: CatalogModel) -> HttpResponse:
    return error_response(502, f"The engine serving {model.model_id} did not answer; retry the request.",
                          type="server_error", code="engine_unavailable")


# A file path or a traceback line in an engine's message: never passed on to the client.
_INTERNALS = re.compile(r"(?:/[\w.\-]+){2,}|\bFile \"|Traceback|line \d+")


def engine_error(model: CatalogModel, status: int, content: bytes) -> HttpResponse:
    """An engine's 4xx or 5xx in the OpenAI shape, with its message but none of its internals: a
    request the engine refused as invalid is a 400 (with `param` when it names the field), anything
    else a 502 engine_error."""
    message, param = "", None
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        message, param = str(parsed["error"].get("message") or ""), parsed["error"].get("param")
    elif isinstance(parsed, dict) and isinstance(parsed.get("detail"), list) and parsed["detail"]:
        first = parsed["detail"][0] if isinstance(parsed["detail"][0], dict) else {}
        message = str(first.get("msg", ""))
        loc = [str(part) for part in first.get("loc", []) if part != "body"]
        param = ".".join(loc) or None
    elif isinstance(parsed, dict) and isinstance(parsed.get("detail"), str):
        message = parsed["detail"]
    lines = [line.strip() for line in message.splitlines() if line.strip() and not _INTERNALS.search(line)]
    message = lines[0][:500] if lines else ""
    if status in (400, 422) and message:
        return error_response(400, f"{model.model_id}'s engine refused the request: {message}",
                              type="invalid_request_error", code="invalid_request", param=param)
    return error_response(502, f"The engine serving {model.model_id} failed on this request"
                               + (f": {message}" if message else "."), type="server_error", code="engine_error")


def _engine_gates() -> dict[int, asyncio.Semaphore]:
    return {}


class _Accounting:
    """One request in flight on an instance (and, for a warm hit, one served request), from its
    arrival (a queued request is load: replicas scale on it), holding one of the engine's slots:
    `enter` waits, in arrival order, while this process already has as many requests on the engine
    as it serves at once."""

    def __init__(self, instance_id: int, served_model_id: str | None) -> None:
        self.instance_id, self.counted, self.gate, self.holds, self.queued_s = instance_id, True, None, False, 0.0
        tally().enter(instance_id, served_model_id)

    async def enter(self, slots: int) -> None:
        gates = per_loop(_engine_gates)
        self.gate = gates.get(self.instance_id)
        if self.gate is None:
            self.gate = gates[self.instance_id] = asyncio.Semaphore(slots)
        if self.gate.locked():
            started = time.monotonic()
            try:
                await self.gate.acquire()
            except BaseException:
                self.close()
                raise
            self.queued_s = time.monotonic() - started
        else:
            await self.gate.acquire()
        self.holds = True

    def close(self) -> None:
        if self.holds:
            self.holds = False
            self.gate.release()
        if self.counted:
            self.counted = False
            tally().leave(self.instance_id)


class _EngineStream:
    """An engine's streamed answer, passed on as its bytes come. Closing it before the end (the
    client went away) closes the engine connection, which cancels the generation."""

    def __init__(self, upstream: aiohttp.ClientResponse, accounting: _Accounting) -> None:
        self.upstream, self.accounting, self.finished = upstream, accounting, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self.upstream.content.iter_any():
                yield part
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            # The engine broke off (crashed, was stopped): say so in the stream, in the OpenAI shape.
            yield _error_event(error_response(502, "The engine stopped in the middle of this answer; retry the "
                                                   "request.", type="server_error", code="engine_unavailable"))
            return
        self.finished = True

    async def aclose(self) -> None:
        try:
            if self.finished:
                self.upstream.release()
            else:
                self.upstream.close()
        finally:
            self.accounting.close()


async def proxy(route: Route, *, path: str, payload: bytes, stream: bool, model: CatalogModel,
                count_served: bool = False) -> HttpResponse:
    """Forward the caller's (validated) body to the engine as it came. With `count_served`, the
    request also counts as served demand."""
    accounting = _Accounting(route.instance_id, model.model_id if count_served else None)
    await accounting.enter(route.slots)
    queue_observe(model.model_id, accounting.queued_s)
    try:
        upstream = await engine_post(route.base_url + path, payload)
    except EngineUnreachable as exc:
        accounting.close()
        forget_route(model)
        await sync_to_async(instance_fail_unreachable, thread_sensitive=False)(
            instance_id=route.instance_id, url=route.base_url, error=str(exc))
        raise EngineGone from None
    except EngineUnavailable:
        accounting.close()
        forget_route(model)
        raise EngineGone from None
    except BaseException:  # cancelled (the client left): the slot goes to the next in line
        accounting.close()
        raise
    if not stream or upstream.status != 200:
        try:
            content = await engine_read(upstream)
        except EngineUnavailable:
            return engine_unavailable(model)  # it broke off mid-answer: the request may have run
        finally:
            accounting.close()
        if upstream.status >= 400:
            response = engine_error(model, upstream.status, content)
            _porten_headers(response, route, accounting.queued_s)
            return response
        response = HttpResponse(content, status=upstream.status,
                                content_type=upstream.headers.get("Content-Type", "application/json"))
        response["Content-Length"] = str(len(content))  # framed by its length, not chunked
        _porten_headers(response, route, accounting.queued_s)
        return response
    response = EventStream(_EngineStream(upstream, accounting))
    _porten_headers(response, route, accounting.queued_s)
    return response


class _ColdStream:
    """A streamed answer for a model that is not ready: the headers go out at once, an SSE comment
    with the load's progress every PORTEN_STREAM_KEEPALIVE_S (so proxies in front keep the
    connection), then the engine's stream as it comes; a load that fails or outlasts the budget ends
    the stream with an OpenAI-shaped error event."""

    def __init__(self, model: CatalogModel, *, path: str, payload: bytes, budget_s: float) -> None:
        self.model, self.path, self.payload, self.budget_s = model, path, payload, budget_s
        self.source: AsyncIterator[bytes] | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        waiting = asyncio.ensure_future(warm_route(self.model, budget_s=self.budget_s))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=settings.PORTEN_STREAM_KEEPALIVE_S)
                if done:
                    break
                state = model_events().latest.get(self.model.model_id)
                shown = state.public() if state is not None else WarmingState(model=self.model.model_id, phase="queued")
                yield f": warming {shown.phase} {int(shown.pct)}%\n\n".encode()
            try:
                route = waiting.result()
                response = await proxy(route, path=self.path, payload=self.payload, stream=True, model=self.model)
            except WarmupFailed as failure:
                yield _error_event(failure.response)
                return
            except EngineGone:
                yield _error_event(engine_unavailable(self.model))
                return
            if not isinstance(response, EventStream):
                yield _error_event(response)
                return
            if route.load_seconds is not None:
                yield f": loaded in {route.load_seconds:.3f} s on {route.node}\n\n".encode()
            self.source = response.source
            async for part in response.source:
                yield part
        finally:
            waiting.cancel()

    async def aclose(self) -> None:
        if self.source is not None:
            await self.source.aclose()


def _error_event(response: HttpResponse) -> bytes:
    """An error as the last event of a stream that began with a 200: the OpenAI shape, plus the
    status the error would have had as an answer of its own."""
    body = json.loads(response.content)
    body["error"]["status"] = response.status_code
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def cold_stream(model: CatalogModel, *, path: str, payload: bytes, budget_s: float) -> EventStream:
    response = EventStream(_ColdStream(model, path=path, payload=payload, budget_s=budget_s))
    response["X-Porten-Cold-Start"] = "true"
    return response


async def model_prewarm(model: CatalogModel) -> None:
    """Start loading a model someone picked in the playground, so the load overlaps with their
    typing. A pick counts as unmet demand, like a cold request. Raises PlacementError when the
    fleet cannot take it."""
    if await _active_instances.fetch(model) is not None:
        return
    await record_demand(model.model_id, served=False)
    await _ensure(model)


async def record_demand(model_id: str, *, served: bool) -> None:
    try:
        await demand_record(model_id, served=served)
    except Exception:
        # Demand feeds eviction choices; losing one count must never fail a request.
        logger.warning("could not record demand for %s", model_id, exc_info=True)

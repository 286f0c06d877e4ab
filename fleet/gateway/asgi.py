"""The /v1 token routes as a small ASGI application in front of Django's: a call runs its view with
no middleware stack and no thread hop (the views check keys, sessions and CSRF themselves), and
everything else goes to Django and Channels unchanged."""
from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.db import close_old_connections
from django.http import HttpResponse, StreamingHttpResponse

from porten.errors import error_response, invalid_request
from porten.metrics import NO_MODEL, process_started, process_stopped, request_observe

from .engine_client import close_engine_session
from .metering import COUNT_EVERY_PARTS

logger = logging.getLogger(__name__)

RECYCLE_CONNECTIONS_S = 5.0

View = Callable[[ASGIRequest], Awaitable[HttpResponse]]


class EventStream(StreamingHttpResponse):
    """Server-sent events passed on as they come. `source` is the async iterator of byte parts,
    with `aclose()`; the gateway app sends each part as it arrives and closes the source however
    the answer ends (the client leaving included). Under Django's handler it is an ordinary
    StreamingHttpResponse."""

    def __init__(self, source: AsyncIterator[bytes], **kwargs) -> None:
        super().__init__(source, content_type="text/event-stream", **kwargs)
        self.source = source
        self.meter = None  # a metering.StreamMeter that sees each part as it is sent, if any
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


async def read_body(receive, limit: int) -> bytes:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise BodyTooLarge
        parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def response_headers(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.items()]
    headers += [(b"Set-Cookie", c.output(header="").strip().encode("latin-1")) for c in response.cookies.values()]
    return headers


class GatewayApp:
    """ASGI: `routes` (path -> async view) served here, any other scope passed to `fallback`."""

    def __init__(self, fallback, routes: dict[str, View]) -> None:
        self.fallback, self.routes = fallback, routes
        self.connections_checked_at = time.monotonic()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        view = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if view is None:
            return await self.fallback(scope, receive, send)
        started = time.perf_counter()
        try:
            body = await read_body(receive, settings.PORTEN_MAX_BODY_BYTES)
        except ClientGone:
            return
        except BodyTooLarge:
            await send_response(too_large(), send)
            request_observe(NO_MODEL, 413, False, time.perf_counter() - started, None)
            return
        request = ASGIRequest(scope, io.BytesIO(body))
        # A client that leaves cancels the view, and so its engine request (as Django's handler does).
        task = asyncio.current_task()
        state = {"answered": False, "cancelled": False}

        def on_receive(listener: asyncio.Task) -> None:
            if listener.cancelled() or listener.exception() is not None or state["answered"]:
                return
            if listener.result()["type"] == "http.disconnect":
                state["cancelled"] = True
                task.cancel()

        listener = asyncio.ensure_future(receive())
        listener.add_done_callback(on_receive)
        response, first_event_at = None, None
        try:
            try:
                response = await view(request)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s %s failed", scope.get("method"), scope["path"])
                response = error_response(500, "The server failed while handling this request.",
                                          type="server_error", code="internal_error")
            first_event_at = await send_response(response, send)
        except asyncio.CancelledError:
            if not state["cancelled"]:
                raise  # the server is stopping
            task.uncancel()  # the client went away: nothing is left to answer
        finally:
            state["answered"] = True
            listener.cancel()
            # 499 (as nginx logs it): the client left before its answer was whole.
            request_observe(getattr(request, "porten_model", NO_MODEL),
                            499 if state["cancelled"] or response is None else response.status_code,
                            response is not None and response.get("X-Porten-Cold-Start") == "true",
                            time.perf_counter() - started,
                            None if first_event_at is None else first_event_at - started)
        await self.recycle_connections()

    async def lifespan(self, receive, send) -> None:
        """ASGI lifespan: nothing to start; on shutdown, close the connections to engines."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                process_started()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await close_engine_session()
                process_stopped()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def recycle_connections(self) -> None:
        # The async ORM's connection lives in asgiref's shared thread, and there is no request_finished
        # here to recycle it: check it every few seconds.
        now = time.monotonic()
        if now - self.connections_checked_at >= RECYCLE_CONNECTIONS_S:
            self.connections_checked_at = now
            await sync_to_async(close_old_connections)()


async def send_response(response: HttpResponse, send) -> float | None:
    """Send the answer; for an event stream, returns when (time.perf_counter) its first event went
    out: not an SSE comment (a cold stream's keep-alives) nor an error event."""
    start = {"type": "http.response.start", "status": response.status_code, "headers": response_headers(response)}
    if not isinstance(response, EventStream):
        if not response.has_header("Content-Length"):
            response["Content-Length"] = str(len(response.content))  # framed by its length, not chunked
            start["headers"] = response_headers(response)
        await send(start)
        await send({"type": "http.response.body", "body": response.content})
        return None
    source, meter, first_event_at = response.source, response.meter, None
    passed = meter.passed if meter is not None and not meter.wants_usage else None
    try:
        await send(start)
        async for part in source:
            if passed is not None and not meter.pending and part.endswith(b"\n\n") and b'"usage"' not in part:
                passed.append(part)  # the common part, kept as metering.StreamMeter says
                if len(passed) >= COUNT_EVERY_PARTS:
                    meter.count()
            elif meter is not None and not (part := meter.feed(part)):
                continue
            await send({"type": "http.response.body", "body": part, "more_body": True})
            if first_event_at is None and part[:1] != b":" and not part.startswith(b'data: {"error"'):
                first_event_at = time.perf_counter()
        await send({"type": "http.response.body", "body": meter.end() if meter is not None else b""})
    finally:
        try:
            await source.aclose()
        finally:
            if meter is not None:
                meter.close()
    return first_event_at


def too_large() -> HttpResponse:
    return invalid_request(f"The request body is larger than {settings.PORTEN_MAX_BODY_BYTES} bytes.",
                           status=413, code="request_too_large")

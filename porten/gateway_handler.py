"""A lean ASGI handler for the token-serving routes.

It is Django's own request/response handling (ASGIRequest, URL resolving, StreamingHttpResponse,
client-disconnect cancellation) with three costs removed that a /v1 call does not need and that
dominate its latency under ASGI (measured: ~6 ms of a 7 ms request):
- the middleware stack (sessions, messages, CSRF...), each a thread hop per request: session
  callers (the playground) are authenticated and CSRF-checked by the views (porten.auth);
- a fresh ThreadSensitiveContext per request, which starts and joins a thread every time;
- request_started/request_finished signals, dispatched through that thread. Their one job here,
  recycling stale database connections, is done at most every few seconds instead;
- resolving the URL against the whole URLconf: each gateway path is resolved once.
The hot path then touches no thread at all; cache misses use the async ORM as usual. A request
also leaves no reference cycle behind (Django's handler left one per request, through the
disconnect listener's exception), so the cycle collector rarely has anything to do.
"""
from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import close_old_connections
from django.http import StreamingHttpResponse
from django.urls import ResolverMatch, set_script_prefix
from django.utils.log import log_response

from porten.serve import SERVER_EXTENSION

GATEWAY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
RECYCLE_CONNECTIONS_S = 5.0


class PassThroughStream(StreamingHttpResponse):
    """A stream of bytes ready to send as they come (an engine's server-sent events). The lean
    handler sends each part as one message, without the per-part layers Django's handler runs
    (its __aiter__ and make_bytes wrappers, a chunk_bytes generator per part); anywhere else it is a
    StreamingHttpResponse like any other. `parts` may also have `push(write)`, which calls
    write(part) for each part as it comes and at the end returns the last part unwritten (or b""),
    and `aclose()`: under porten.serve (SERVER_EXTENSION) the lean handler then has the parts pushed
    to the server's write, with no ASGI message and no task wake-up per part."""

    def __init__(self, parts: AsyncIterator[bytes], **kwargs) -> None:
        super().__init__(parts, **kwargs)
        self.parts = parts


def _raw_headers(response, but: str | None = None) -> list[tuple[bytes, bytes]]:
    """The response's headers and cookies as an ASGI server takes them (as Django's send_response
    makes them), less the header named `but` (lower case)."""
    headers = [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()
               if but is None or name.lower() != but]
    headers += [(b"Set-Cookie", c.output(header="").encode("ascii").strip()) for c in response.cookies.values()]
    return headers


class _Call:
    """One call's task, cancelled if its client disconnects before the answer is sent. Outcomes are
    read off the listener, never raised here: a raised exception's traceback would hold the frame
    that holds the tasks that hold the exception, a cycle (with the request and response in it) per
    call that only the cyclic garbage collector could free. Django's own handler leaves one."""

    __slots__ = ("task", "over", "cancelled_for_disconnect")

    def __init__(self, task: asyncio.Task) -> None:
        self.task, self.over, self.cancelled_for_disconnect = task, False, False

    def client_left(self, listener: asyncio.Task) -> None:
        if listener.cancelled() or not isinstance(listener.exception(), RequestAborted):
            return  # cancelled by us once the answer was sent
        self.client_gone()

    def client_gone(self) -> None:
        if not self.over:  # else the disconnect came after the answer
            self.cancelled_for_disconnect = True
            self.task.cancel()


class GatewayASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self._connections_checked_at = time.monotonic()
        self._resolved: dict[str, ResolverMatch] = {}

    def resolve_request(self, request) -> ResolverMatch:
        # Only GATEWAY_PATHS come here: resolve each once. Walking the URLconf (admin included)
        # to reach them cost about 8 % of the hub's CPU per request.
        match = self._resolved.get(request.path_info)
        if match is None:
            match = self._resolved[request.path_info] = super().resolve_request(request)
        request.resolver_match = match
        return match

    async def read_body(self, receive):
        # A /v1 body (a few KB of JSON) comes in one message: keep it in memory. Anything larger
        # than Django's in-memory limit, or in several messages, goes Django's way (a spooled file).
        first = await receive()
        body = first.get("body", b"")
        if first["type"] == "http.request" and not first.get("more_body", False) \
                and len(body) <= settings.FILE_UPLOAD_MAX_MEMORY_SIZE:
            return io.BytesIO(body)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return first

        return await super().read_body(replay)

    async def send_response(self, response, send, server: dict | None = None) -> None:
        """Django's; under porten.serve (`server`: its SERVER_EXTENSION) a whole answer is handed to
        its respond, and a PassThroughStream that can push its parts goes through its start, write
        and end; otherwise the parts go one message each."""
        if not isinstance(response, PassThroughStream):
            if server is None or response.streaming:
                return await super().send_response(response, send)
            # respond frames the answer by its length itself
            server["respond"](response.status_code, _raw_headers(response, but="content-length"), response.content)
            return
        headers = _raw_headers(response)
        parts = response.parts
        push = getattr(parts, "push", None) if server is not None else None
        try:
            if push is not None:
                # The headers go out now, while the engine works on its first part (held until
                # the first part, they would delay that first token).
                server["start"](response.status_code, headers)
                server["end"](await push(server["write"]))  # the last part goes out with the end, in one send
                return
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async for part in parts:
                if part:
                    await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body"})
        finally:
            await parts.aclose()  # as Django's aclosing(): a stream left early still closes its source

    async def get_response_async(self, request):
        # Django's, less set_urlconf: the gateway paths resolve against ROOT_URLCONF, the default.
        response = await self._middleware_chain(request)
        response._resource_closers.append(request.close)
        if response.status_code >= 400:
            await sync_to_async(log_response, thread_sensitive=False)(
                "%s: %s", response.reason_phrase, request.path, response=response, request=request)
        return response

    async def _get_response_async(self, request):
        # Django's, for the gateway views: async, with no view or template middleware and no
        # atomic requests (Django refuses those for async views).
        callback, callback_args, callback_kwargs = self.resolve_request(request)
        response = await callback(request, *callback_args, **callback_kwargs)
        self.check_response(response, callback)
        return response

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)

    async def __call__(self, scope, receive, send) -> None:
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        script_prefix = get_script_prefix(scope)
        if script_prefix not in ("", "/"):  # "/" is what an unset prefix reads as
            set_script_prefix(script_prefix)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            return

        # As in Django, a client disconnect cancels the view (and so the upstream request), but the
        # view runs in this task rather than a second one: one task and one loop turn less per call.
        # Under porten.serve the server calls back on a disconnect: no listening task at all.
        call = _Call(asyncio.current_task())
        server = scope.get("extensions", {}).get(SERVER_EXTENSION)
        if server is not None:
            listener = None
            server["on_disconnect"](call.client_gone)
        else:
            listener = asyncio.create_task(self.listen_for_disconnect(receive))
            listener.add_done_callback(call.client_left)
        try:
            response = await self.run_get_response(request)
            await self.send_response(response, send, server)
            await self._recycle_connections()
        except asyncio.CancelledError:
            if not call.cancelled_for_disconnect:
                raise  # the server is stopping
            call.task.uncancel()  # the client went away: nothing is left to answer
        finally:
            call.over = True
            if listener is not None:
                listener.cancel()
            body_file.close()

    async def _recycle_connections(self) -> None:
        now = time.monotonic()
        if now - self._connections_checked_at >= RECYCLE_CONNECTIONS_S:
            self._connections_checked_at = now
            # The async ORM runs in the process's shared sync thread: check its connection there.
            await sync_to_async(close_old_connections)()


def route_gateway(default_app, gateway_app=None):
    """An ASGI app sending the gateway paths to the lean handler and everything else to `default_app`."""
    gateway_app = gateway_app or GatewayASGIHandler()

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope.get("path") in GATEWAY_PATHS:
            return await gateway_app(scope, receive, send)
        return await default_app(scope, receive, send)

    return app

"""The lean ASGI handler for /v1 calls, driven the way daphne drives it."""
import asyncio
import gc

import pytest

from django.core.handlers.asgi import ASGIRequest
from django.http.response import HttpResponseBase

from porten.gateway_handler import GatewayASGIHandler


async def call(handler, body: bytes = b"{}") -> list[dict]:
    """One POST /v1/chat/completions; like daphne, the app hears http.disconnect once the answer is sent."""
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": body, "more_body": False})
    sent = []

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            inbox.put_nowait({"type": "http.disconnect"})

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000)}
    await asyncio.wait_for(handler(scope, inbox.get, send), timeout=10)
    return sent


async def test_a_request_leaves_no_reference_cycles_for_the_garbage_collector():
    handler = GatewayASGIHandler()
    await call(handler)  # first-call caches (URL resolving) are not per-request garbage
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        answers = [await call(handler) for _ in range(3)]
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, (ASGIRequest, HttpResponseBase, BaseException))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert [answer[0]["status"] for answer in answers] == [401, 401, 401]  # no key: the view answered
    assert cyclic == [], "each request left a cycle the collector had to find"


class SlowViewHandler(GatewayASGIHandler):
    """The handler with a view that never answers, noting when it is cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.cancelled = asyncio.Event(), False

    async def run_get_response(self, request):
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def _slow_call(handler, inbox: asyncio.Queue, sent: list, scope_extensions: dict | None = None):
    inbox.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"", "headers": []}
    if scope_extensions is not None:
        scope["extensions"] = scope_extensions
    return asyncio.create_task(handler(scope, inbox.get, send))


@pytest.mark.parametrize("server_calls_back", [False, True])
async def test_a_client_disconnect_cancels_the_view_and_ends_the_call_quietly(server_calls_back):
    from porten.serve import SERVER_EXTENSION

    handler, inbox, sent = SlowViewHandler(), asyncio.Queue(), []
    callbacks = []
    extensions = {SERVER_EXTENSION: {"write": sent.append, "on_disconnect": callbacks.append}}
    call = _slow_call(handler, inbox, sent, extensions if server_calls_back else None)
    await asyncio.wait_for(handler.started.wait(), 5)
    if server_calls_back:  # porten.serve calls back; nothing listens on the ASGI queue
        assert len(callbacks) == 1
        callbacks[0]()
    else:
        assert not callbacks
        inbox.put_nowait({"type": "http.disconnect"})
    await asyncio.wait_for(call, 5)  # returns, raises nothing
    assert handler.cancelled and sent == []
    if server_calls_back:
        inbox.put_nowait({"type": "http.disconnect"})
        await asyncio.sleep(0.01)
        assert inbox.qsize() == 1  # nobody read it: no listening task was made


async def test_a_server_stopping_cancels_the_call_and_the_cancellation_goes_on_up():
    handler, inbox, sent = SlowViewHandler(), asyncio.Queue(), []
    call = _slow_call(handler, inbox, sent)
    await asyncio.wait_for(handler.started.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 5)
    assert handler.cancelled and sent == []


class BodyHandler(GatewayASGIHandler):
    """The handler with a view that answers with the body it was given."""

    async def run_get_response(self, request):
        from django.http import HttpResponse

        return HttpResponse(request.body)


@pytest.mark.parametrize("parts", [[b'{"model": "m"}'], [b'{"model": ', b'"m"}'], [b"x" * 3_000_000]])
async def test_the_body_reaches_the_view_whole_in_one_message_or_many_and_at_any_size(parts):
    inbox: asyncio.Queue = asyncio.Queue()
    for i, part in enumerate(parts):
        inbox.put_nowait({"type": "http.request", "body": part, "more_body": i < len(parts) - 1})
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"", "headers": []}
    await asyncio.wait_for(BodyHandler()(scope, inbox.get, send), 10)
    assert sent[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"".join(parts)


class StreamHandler(GatewayASGIHandler):
    """The handler with a view that streams parts, noting whether its stream was closed."""

    def __init__(self, parts: list[bytes]) -> None:
        super().__init__()
        self.parts, self.closed = parts, False

    async def run_get_response(self, request):
        from porten.gateway_handler import PassThroughStream

        async def stream():
            try:
                for part in self.parts:
                    yield part
            finally:
                self.closed = True

        response = PassThroughStream(stream(), content_type="text/event-stream")
        response["X-Porten-Cold-Start"] = "false"
        response.set_cookie("seen", "1")
        return response


async def test_a_pass_through_stream_goes_out_part_by_part_with_its_headers():
    handler = StreamHandler([b"data: 1\n\n", b"", b"data: [DONE]\n\n"])
    sent = await call(handler)
    start, *body = sent
    headers = dict(start["headers"])
    assert start["status"] == 200 and headers[b"Content-Type"] == b"text/event-stream"
    assert headers[b"X-Porten-Cold-Start"] == b"false" and headers[b"Set-Cookie"].startswith(b"seen=1")
    assert body == [{"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True},
                    {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True},
                    {"type": "http.response.body"}]
    assert handler.closed


async def test_a_pass_through_stream_whose_send_fails_closes_its_source():
    handler = StreamHandler([b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"])
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})
    sent = []

    async def send(message):
        if len(sent) == 2:
            raise OSError("the server could not write")
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"", "headers": []}
    with pytest.raises(OSError):
        await asyncio.wait_for(handler(scope, inbox.get, send), 10)
    assert handler.closed and len(sent) == 2


class Pushable:
    """A stream source that can also push its parts to a writer, as the gateway's engine streams can."""

    def __init__(self, parts: list[bytes], fail_after: int | None = None) -> None:
        self.parts, self.fail_after, self.closed = parts, fail_after, False

    async def __aiter__(self):
        for part in self.parts:
            yield part

    async def push(self, write) -> bytes:
        *parts, last = self.parts
        for i, part in enumerate(parts):
            if i == self.fail_after:
                raise ConnectionError("the engine went away")
            write(part)
            await asyncio.sleep(0)
        return last  # what came with the end

    async def aclose(self) -> None:
        self.closed = True


class PushHandler(GatewayASGIHandler):
    def __init__(self, source: Pushable) -> None:
        super().__init__()
        self.source = source

    async def run_get_response(self, request):
        from porten.gateway_handler import PassThroughStream

        return PassThroughStream(self.source, content_type="text/event-stream")


@pytest.mark.parametrize("server_writes", [True, False])
async def test_a_pass_through_stream_is_pushed_to_the_servers_write_when_it_offers_one(server_writes):
    from porten.serve import SERVER_EXTENSION

    source = Pushable([b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"])
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})
    sent, started, written, ended = [], [], [], []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"", "headers": []}
    if server_writes:
        scope["extensions"] = {SERVER_EXTENSION: {
            "start": lambda *args: started.append(args), "write": written.append, "end": ended.append,
            "on_disconnect": lambda callback: None}}
    await asyncio.wait_for(PushHandler(source)(scope, inbox.get, send), 10)
    if server_writes:  # the headers at once, the parts written, the last one with the end: no ASGI message
        (status, headers), = started
        assert status == 200 and (b"Content-Type", b"text/event-stream") in headers and sent == []
        assert written == [b"data: 1\n\n", b"data: 2\n\n"] and ended == [b"data: [DONE]\n\n"]
    else:
        start, *body = sent
        assert start["type"] == "http.response.start"
        assert [m.get("body") for m in body] == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n", None]
        assert not written and not ended
    assert source.closed


async def test_a_pushed_stream_that_breaks_closes_its_source_and_the_error_goes_up():
    from porten.serve import SERVER_EXTENSION

    source = Pushable([b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"], fail_after=1)
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})
    sent, started, written, ended = [], [], [], []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"", "headers": [],
             "extensions": {SERVER_EXTENSION: {"start": lambda *args: started.append(args), "write": written.append,
                                               "end": ended.append, "on_disconnect": lambda callback: None}}}
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(PushHandler(source)(scope, inbox.get, send), 10)
    assert len(started) == 1 and written == [b"data: 1\n\n"] and source.closed
    assert not ended and sent == []  # no clean end


class AnswerHandler(GatewayASGIHandler):
    """The handler with a view that gives `response`."""

    def __init__(self, response) -> None:
        super().__init__()
        self.response = response

    async def run_get_response(self, request):
        return self.response


async def test_a_whole_answer_goes_to_the_servers_respond_when_it_offers_one():
    from django.http import HttpResponse, StreamingHttpResponse

    from porten.serve import SERVER_EXTENSION

    answered, written = [], []
    extensions = {SERVER_EXTENSION: {"write": written.append, "on_disconnect": lambda callback: None,
                                     "respond": lambda *args: answered.append(args)}}
    response = HttpResponse(b'{"id": 1}', status=201, content_type="application/json")
    response["Content-Length"] = "9"  # respond frames the answer itself
    response["X-Porten-Cold-Start"] = "false"
    response.set_cookie("seen", "1")
    inbox, sent = asyncio.Queue(), []
    assert not await asyncio.wait_for(_slow_call(AnswerHandler(response), inbox, sent, extensions), 10)
    (status, headers, body), = answered
    assert (status, body, sent) == (201, b'{"id": 1}', [])  # no ASGI message at all
    assert headers[:2] == [(b"Content-Type", b"application/json"), (b"X-Porten-Cold-Start", b"false")]
    assert len(headers) == 3 and headers[2][0] == b"Set-Cookie" and headers[2][1].startswith(b"seen=1")

    # A stream that is not a PassThroughStream still goes out as ASGI messages.
    answered.clear()
    async def parts():
        yield b"a"
        yield b"b"

    streamed = StreamingHttpResponse(parts())
    await asyncio.wait_for(_slow_call(AnswerHandler(streamed), asyncio.Queue(), sent, extensions), 10)
    assert not answered and sent[0]["type"] == "http.response.start"
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"ab"

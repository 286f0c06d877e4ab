"""The gateway's engine client (aiohttp) against a real TCP server that answers the way engines
(and broken engines) do: keep-alive reuse, stale connections, timeouts, early close, broken answers."""
from __future__ import annotations

import asyncio

import pytest

from fleet.gateway.engine_client import EngineUnavailable, engine_post, engine_read
from fleet.gateway.warm import _EngineStream


class ScriptedEngine:
    """An HTTP/1.1 server on 127.0.0.1 whose every answer is written by `answer(request_number, writer)`."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()  # set when a client closes a connection

    async def __aenter__(self) -> ScriptedEngine:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                if await self.answer(len(self.requests), writer) == "close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        finally:
            writer.close()


def sized(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (
        len(body), extra) + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Accounting:
    closed = False

    def close(self) -> None:
        self.closed = True


async def post_and_read(url: str) -> bytes:
    return await engine_read(await engine_post(url, b'{"model": "m"}'))


async def test_answers_are_read_whole_and_the_connection_is_kept_alive():
    async def answer(n, writer):
        writer.write(sized(b'{"n": %d}' % n))

    async with ScriptedEngine(answer) as engine:
        assert await post_and_read(engine.url + "/v1/x") == b'{"n": 1}'
        assert await post_and_read(engine.url + "/v1/x") == b'{"n": 2}'
    assert engine.connections == 1
    assert b"content-type: application/json" in engine.requests[0].lower()
    assert engine.requests[0].endswith(b'{"model": "m"}')


async def test_a_cookie_an_engine_sets_never_rides_on_the_next_request():
    async def answer(n, writer):
        writer.write(sized(b"{}", b"Set-Cookie: session=caller-one\r\n"))

    async with ScriptedEngine(answer) as engine:
        await post_and_read(engine.url + "/x")
        await post_and_read(engine.url + "/x")
    assert b"cookie" not in engine.requests[1].lower()


async def test_a_kept_alive_connection_the_engine_closed_is_replaced():
    async def answer(n, writer):
        writer.write(sized(b'{"ok": true}', b"Connection: keep-alive\r\n"))
        await writer.drain()
        return "close"  # as an engine restarting, or timing idle connections out, would

    async with ScriptedEngine(answer) as engine:
        assert await post_and_read(engine.url + "/x") == b'{"ok": true}'
        await asyncio.sleep(0.05)
        assert await post_and_read(engine.url + "/x") == b'{"ok": true}'
    assert len(engine.requests) == 2 and engine.connections == 2


async def test_a_silent_engine_times_out(settings):
    settings.PORTEN_UPSTREAM_TIMEOUT_S = 0.3

    async def answer(n, writer):
        await asyncio.sleep(30)

    async with ScriptedEngine(answer) as engine:
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(post_and_read(engine.url + "/x"), timeout=5)


async def test_no_engine_listening_is_unavailable_at_once():
    async with ScriptedEngine(None) as engine:
        url = engine.url
    with pytest.raises(EngineUnavailable):
        await asyncio.wait_for(engine_post(url + "/x", b"{}"), timeout=5)


@pytest.mark.parametrize("reply", [
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
async def test_a_broken_answer_is_unavailable(reply):
    async def answer(n, writer):
        writer.write(reply)
        return "close"

    async with ScriptedEngine(answer) as engine:
        with pytest.raises(EngineUnavailable):
            await post_and_read(engine.url + "/x")


async def test_a_stream_arrives_part_by_part_before_the_engine_finishes():
    more = asyncio.Event()

    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(chunk(b"data: one\n\n"))
        await writer.drain()
        await more.wait()
        writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    async with ScriptedEngine(answer) as engine:
        accounting = Accounting()
        stream = _EngineStream(await engine_post(engine.url + "/x", b"{}"), accounting)
        parts = []
        async for part in stream:
            parts.append(part)
            more.set()
        await stream.aclose()
        assert parts == [b"data: one\n\n", b"data: [DONE]\n\n"]
        assert accounting.closed
        # A stream read to its end leaves its connection for the next call.
        async def sized_answer(n, writer):
            writer.write(sized(b"{}"))
        engine.answer = sized_answer
        await post_and_read(engine.url + "/x")
    assert engine.connections == 1


async def test_closing_a_stream_early_closes_the_connection_so_the_engine_stops():
    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            writer.write(chunk(b"token"))
            await writer.drain()
            await asyncio.sleep(0.05)

    async with ScriptedEngine(answer) as engine:
        accounting = Accounting()
        stream = _EngineStream(await engine_post(engine.url + "/x", b"{}"), accounting)
        async for part in stream:
            assert part == b"token"
            break
        await stream.aclose()
        await asyncio.wait_for(engine.closed.wait(), timeout=5)
    assert accounting.closed


async def test_the_hub_closes_its_engine_connections_when_the_server_stops():
    from fleet.gateway.asgi import GatewayApp

    async def answer(n, writer):
        writer.write(sized(b"{}"))

    async with ScriptedEngine(answer) as engine:
        await post_and_read(engine.url + "/x")
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message["type"])

        await GatewayApp(None, routes={})({"type": "lifespan"}, receive, send)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        await asyncio.wait_for(engine.closed.wait(), timeout=5)

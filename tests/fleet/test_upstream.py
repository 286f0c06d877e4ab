"""The gateway's engine transport against a real TCP server that answers the way engines (and
broken engines) do: framing, keep-alive reuse, stale connections, timeouts, early close."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from fleet.upstream import EngineClient, EngineTransport, _Chunks


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


def client(**timeouts) -> httpx.AsyncClient:
    return EngineClient(timeout=httpx.Timeout(timeouts.get("read", 5.0), connect=2.0))


async def test_answers_are_read_by_length_and_the_connection_is_kept_alive():
    async def answer(n, writer):
        writer.write(sized(json.dumps({"n": n}).encode()))

    async with ScriptedEngine(answer) as engine, client() as http:
        for n in (1, 2, 3):
            response = await http.post(engine.url + "/v1/chat/completions", json={"model": "m", "n": n})
            assert response.status_code == 200
            assert response.json() == {"n": n}
    assert engine.connections == 1
    first = engine.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    head, body = first.split(b"\r\n\r\n", 1)
    assert json.loads(body) == {"model": "m", "n": 1}
    assert b"\r\nContent-Length: %d" % len(body) in head


async def test_a_cookie_an_engine_sets_for_one_caller_never_rides_on_the_next_request():
    async def answer(n, writer):
        writer.write(sized(b'{"n": %d}' % n, b"Set-Cookie: session=caller-one; Path=/\r\n"))

    async with ScriptedEngine(answer) as engine, client() as http:
        first = await http.post(engine.url + "/v1/chat/completions", content=b"{}")
        assert first.headers["set-cookie"].startswith("session=caller-one")
        await http.post(engine.url + "/v1/chat/completions", content=b"{}")
    assert b"cookie" not in engine.requests[1].lower()
    with pytest.raises(ValueError):
        EngineClient().cookies = {"session": "x"}


async def test_engines_are_asked_for_unencoded_answers_so_streams_pass_through_as_they_came():
    async def answer(n, writer):
        writer.write(sized(b"{}"))

    async with ScriptedEngine(answer) as engine, client() as http:
        await http.post(engine.url + "/v1/chat/completions", content=b"{}")
    assert b"\r\nAccept-Encoding: identity\r\n" in engine.requests[0]


async def test_transport_errors_name_the_request_they_belong_to():
    async with ScriptedEngine(None) as engine:
        url = engine.url + "/v1/completions"
    async with client() as http:
        with pytest.raises(httpx.ConnectError) as raised:
            await http.post(url, content=b"{}")
    assert str(raised.value.request.url) == url


async def test_a_client_with_hooks_or_auth_still_gets_them():
    async def answer(n, writer):
        writer.write(sized(b'{"n": %d}' % n))

    seen = []

    async def on_response(response):
        seen.append(response.status_code)

    async with ScriptedEngine(answer) as engine:
        async with EngineClient(event_hooks={"response": [on_response]}) as http:
            assert (await http.post(engine.url + "/x", content=b"{}")).json() == {"n": 1}
        async with EngineClient(auth=("user", "secret")) as http:
            await http.post(engine.url + "/x", content=b"{}")
    assert seen == [200]
    assert b"\r\nAuthorization: Basic " in engine.requests[1]
    assert b"authorization" not in engine.requests[0].lower()


async def test_a_closed_client_refuses_to_send():
    http = client()
    await http.aclose()
    with pytest.raises(RuntimeError):
        await http.post("http://127.0.0.1:9/x", content=b"{}")


async def test_a_chunked_stream_arrives_chunk_by_chunk_before_the_engine_finishes():
    release = asyncio.Event()

    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(chunk(b"data: first\n\n"))
        await writer.drain()
        await release.wait()
        writer.write(chunk(b"data: second\n\n") + b"0\r\n\r\n")

    async with ScriptedEngine(answer) as engine, client() as http:
        async with http.stream("POST", engine.url + "/v1/completions", json={"stream": True}) as response:
            parts = response.aiter_raw()
            assert await anext(parts) == b"data: first\n\n"  # while the engine still holds the rest
            release.set()
            assert [p async for p in parts] == [b"data: second\n\n"]
        again = await http.post(engine.url + "/v1/completions", json={"stream": True})
        assert again.content == b"data: first\n\ndata: second\n\n"
    assert engine.connections == 1  # read to the end, so reused


CHUNKED = chunk(b"data: one\n\n") + b"b;ext=1\r\ndata: two\n\n\r\n" + chunk(b"x" * 300) + b"0\r\nX-Trailer: t\r\n\r\n"


def test_chunked_coding_fed_a_byte_at_a_time_decodes_to_the_same_data():
    decoder, out = _Chunks(), b""
    for i in range(len(CHUNKED)):
        out += decoder.feed(CHUNKED[i:i + 1])
    assert out == b"data: one\n\ndata: two\n\n" + b"x" * 300
    assert decoder.finished and not decoder.buffer
    whole = _Chunks()
    assert whole.feed(CHUNKED) == out and whole.finished  # all at once: one piece
    for cut in range(1, len(CHUNKED)):  # whole chunks and the start of the next, then the rest
        halves = _Chunks()
        first = halves.feed(memoryview(CHUNKED)[:cut])  # as the connection hands it over
        assert first + halves.feed(memoryview(CHUNKED)[cut:]) == out and halves.finished, cut
        assert not halves.buffer
    tail = _Chunks()
    assert tail.feed(CHUNKED + b"JUNK") == out and bytes(tail.buffer) == b"JUNK"  # kept: the connection is not reused


@pytest.mark.parametrize("broken", [b"5\r\nhelloXX", b"-5\r\nhello\r\n", b"zz\r\n", b"1" * 70_000])
def test_broken_chunked_coding_is_refused(broken):
    with pytest.raises(ValueError):
        _Chunks().feed(broken)


async def test_chunks_that_arrived_together_are_passed_on_in_one_piece():
    async def answer(n, writer):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + chunk(b"data: a\n\n") + chunk(b"data: b\n\n") + chunk(b"data: c\n\n"))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(chunk(b"data: d\n\n") + b"0\r\n\r\n")

    async with ScriptedEngine(answer) as engine, client() as http:
        for _ in range(2):
            async with http.stream("POST", engine.url + "/v1/completions", json={"stream": True}) as response:
                parts = [p async for p in response.aiter_raw()]
            assert parts == [b"data: a\n\ndata: b\n\ndata: c\n\n", b"data: d\n\n"]
    assert engine.connections == 1  # read to the end, so reused


async def test_bytes_past_the_end_of_a_chunked_answer_keep_the_connection_from_reuse():
    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"%d" % n) + b"0\r\n\r\nJUNK")

    async with ScriptedEngine(answer) as engine, client() as http:
        assert (await http.post(engine.url + "/x", content=b"{}")).content == b"1"
        assert (await http.post(engine.url + "/x", content=b"{}")).content == b"2"
    assert engine.connections == 2


async def test_a_body_ended_by_closing_the_connection_is_read_whole_and_not_reused():
    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"n\": %d}" % n)
        return "close"

    async with ScriptedEngine(answer) as engine, client() as http:
        assert (await http.post(engine.url + "/x", content=b"{}")).json() == {"n": 1}
        assert (await http.post(engine.url + "/x", content=b"{}")).json() == {"n": 2}
    assert engine.connections == 2


async def test_a_kept_alive_connection_the_engine_closed_is_replaced_transparently():
    async def answer(n, writer):
        writer.write(sized(b'{"ok": true}', b"Connection: keep-alive\r\n"))
        await writer.drain()
        return "close"  # as an engine restarting, or timing idle connections out, would

    async with ScriptedEngine(answer) as engine, client() as http:
        assert (await http.post(engine.url + "/x", content=b"{}")).status_code == 200
        await asyncio.sleep(0.05)
        assert (await http.post(engine.url + "/x", content=b"{}")).status_code == 200
    assert len(engine.requests) == 2
    assert engine.connections == 2


async def test_a_silent_engine_times_out_as_httpx_does():
    async def answer(n, writer):
        await asyncio.sleep(30)

    async with ScriptedEngine(answer) as engine, client(read=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await asyncio.wait_for(http.post(engine.url + "/x", content=b"{}"), timeout=5)


async def test_an_engine_that_stalls_mid_stream_times_out():
    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async with ScriptedEngine(answer) as engine, client(read=0.3) as http:
        async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
            with pytest.raises(httpx.ReadTimeout):
                async for _ in response.aiter_raw():
                    pass


async def test_no_engine_listening_is_a_connect_error():
    async with ScriptedEngine(None) as engine:
        url = engine.url
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(url + "/x", content=b"{}")


async def test_closing_a_stream_early_closes_the_connection_so_the_engine_stops():
    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            writer.write(chunk(b"token"))
            await writer.drain()
            await asyncio.sleep(0.05)

    async with ScriptedEngine(answer) as engine, client() as http:
        async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
            async for part in response.aiter_raw():
                assert part == b"token"
                break
        await asyncio.wait_for(engine.closed.wait(), timeout=5)


@pytest.mark.parametrize("reply", [
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
async def test_a_broken_answer_is_a_protocol_error(reply):
    async def answer(n, writer):
        writer.write(reply)
        return "close"

    async with ScriptedEngine(answer) as engine, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(engine.url + "/x", content=b"{}")


async def test_past_the_connection_limit_requests_queue_for_a_free_connection():
    release = asyncio.Event()

    async def answer(n, writer):
        if n == 1:
            await release.wait()
        writer.write(sized(b'{"n": %d}' % n))

    async with ScriptedEngine(answer) as engine:
        async with EngineClient(transport=EngineTransport(max_connections_per_host=1), timeout=5.0) as http:
            first = asyncio.create_task(http.post(engine.url + "/x", content=b"{}"))
            second = asyncio.create_task(http.post(engine.url + "/x", content=b"{}"))
            await asyncio.sleep(0.2)
            assert engine.connections == 1 and len(engine.requests) == 1  # the second one waits
            release.set()
            assert (await first).json() == {"n": 1}
            assert (await second).json() == {"n": 2}
    assert engine.connections == 1  # handed over, not a second connection


async def test_a_request_that_never_gets_a_connection_fails_with_a_pool_timeout():
    async def answer(n, writer):
        await asyncio.sleep(30)

    async with ScriptedEngine(answer) as engine:
        timeout = httpx.Timeout(5.0, pool=0.2)
        async with EngineClient(transport=EngineTransport(max_connections_per_host=1), timeout=timeout) as http:
            holder = asyncio.create_task(http.post(engine.url + "/x", content=b"{}"))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.PoolTimeout):
                await http.post(engine.url + "/x", content=b"{}")
            holder.cancel()
            with pytest.raises(asyncio.CancelledError):
                await holder
            # The cancelled request gave its connection back: a new one gets a turn at once.
            with pytest.raises(httpx.ReadTimeout):
                await http.post(engine.url + "/x", content=b"{}", timeout=httpx.Timeout(0.3, pool=0.2))


def test_a_json_request_is_what_build_request_makes():
    http = EngineClient(timeout=httpx.Timeout(7.0, connect=2.0))
    url = httpx.URL("http://127.0.0.1:9/v1/chat/completions")
    built = http.build_request("POST", url, content=b'{"a": 1}', headers={"Content-Type": "application/json"})
    made = http.json_request(url, b'{"a": 1}')
    assert made.headers.raw == built.headers.raw
    assert made.extensions == built.extensions and made.method == "POST" and made.url == url
    assert made.content == b'{"a": 1}' and made.read() == b'{"a": 1}'
    # The client's headers and timeout as they are at each call, and each call's own length.
    http.headers["X-Trace"] = "on"
    http.timeout = httpx.Timeout(3.0)
    for target in (url, httpx.URL("http://engine-b:8001/v1/completions")):
        built = http.build_request("POST", target, content=b"{}", headers={"Content-Type": "application/json"})
        made = http.json_request(target, b"{}")
        assert made.headers.raw == built.headers.raw and made.extensions == built.extensions
        assert made.headers["x-trace"] == "on" and made.headers["content-length"] == "2"


async def test_reading_a_whole_answer_by_length_or_chunks_keeps_the_connection():
    async def answer(n, writer):
        if n == 1:
            writer.write(sized(b'{"n": 1}'))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b'{"n": ') + chunk(b"2}")
                         + b"0\r\n\r\n")

    async with ScriptedEngine(answer) as engine, client() as http:
        for n in (1, 2):
            response = await http.send(http.json_request(httpx.URL(engine.url + "/x"), b"{}"), stream=True)
            assert json.loads(await http.read(response)) == {"n": n}
            assert response.is_closed
    assert engine.connections == 1


async def test_an_answers_content_type_and_encoding_are_read_as_its_headers_say():
    async def answer(n, writer):
        if n == 1:
            writer.write(sized(b'{"n": 1}'))
        elif n == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        else:  # an engine that encodes anyway: read through httpx, which decodes it
            import gzip

            body = gzip.compress(b'{"n": 3}')
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=utf-8\r\n"
                         b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    async with ScriptedEngine(answer) as engine, client() as http:
        seen = []
        for _ in range(3):
            response = await http.send(http.json_request(httpx.URL(engine.url + "/x"), b"{}"), stream=True)
            seen.append((http.content_type(response, "text/plain"), response.headers.get("content-type", "text/plain"),
                         await http.read(response)))
    assert [(ours, theirs) for ours, theirs, _ in seen] == [
        ("application/json", "application/json"), ("text/plain", "text/plain"),
        ("application/json; charset=utf-8", "application/json; charset=utf-8")]
    assert [body for _, _, body in seen] == [b'{"n": 1}', b"ok", b'{"n": 3}']
    other = httpx.Response(200, headers={"Content-Type": "text/html"})  # not from the engine transport
    assert EngineClient.content_type(other, "x") == "text/html" and EngineClient.content_type(httpx.Response(200), "x") == "x"


@pytest.mark.parametrize("reply", ["cut short", "silent"])
async def test_reading_a_whole_answer_that_breaks_off_fails_as_httpx_does(reply):
    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        if reply == "silent":
            await asyncio.sleep(30)
        return "close"

    async with ScriptedEngine(answer) as engine, client(read=0.3) as http:
        request = http.json_request(httpx.URL(engine.url + "/x"), b"{}")
        response = await http.send(request, stream=True)
        expected = httpx.ReadTimeout if reply == "silent" else httpx.RemoteProtocolError
        with pytest.raises(expected) as raised:
            await asyncio.wait_for(http.read(response), 5)
        assert raised.value.request is request
        assert response.is_closed


async def test_a_caller_slower_than_the_read_timeout_is_not_taken_for_a_silent_engine():
    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i, pause in enumerate((0.7, 0.05, 0.05)):
            writer.write(chunk(b"token %d " % i))
            await writer.drain()
            await asyncio.sleep(pause)
        writer.write(b"0\r\n\r\n")

    async with ScriptedEngine(answer) as engine, client(read=0.3) as http:
        async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
            got = b""
            async for part in response.aiter_raw():
                got += part
                # The caller takes longer than the read timeout between tokens; then it waits 0.2 s
                # for the engine's next token, which is within the timeout.
                await asyncio.sleep(0.5)
    assert got == b"token 0 token 1 token 2 "


async def test_cancelling_a_reader_mid_stream_is_a_cancellation_not_a_timeout():
    async def answer(n, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"first"))
        await writer.drain()
        await asyncio.sleep(30)

    async with ScriptedEngine(answer) as engine, client(read=0.3) as http:
        async def read_all():
            async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
                async for _ in response.aiter_raw():
                    pass

        reading = asyncio.create_task(read_all())
        await asyncio.sleep(0.2)  # inside the read timeout
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading


# -- pushing a streamed answer to a writer (EngineClient.push) ------------------------------------

STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_a_pushed_stream_reaches_the_writer_part_by_part_as_it_arrives():
    first_out = asyncio.Event()

    async def answer(n, writer):
        writer.write(STREAM_HEAD + chunk(b"data: first\n\n"))  # the first part comes with the head
        await writer.drain()
        await first_out.wait()  # the rest only once the first part was written on
        writer.write(chunk(b"data: second\n\n"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(b"x" * 300) + b"0\r\n\r\n")

    got, in_task = [], []

    def write(part):
        got.append(part)
        in_task.append(asyncio.current_task() is not None)
        first_out.set()

    async with ScriptedEngine(answer) as engine, client() as http:
        async with http.stream("POST", engine.url + "/v1/completions", json={"stream": True}) as response:
            last = await asyncio.wait_for(http.push(response, write), timeout=5)
        assert got == [b"data: first\n\n", b"data: second\n\n"]
        assert last == b"x" * 300  # it came with the end: left for the caller to send with its own end
        # What came with the head goes out from the pushing task; the rest from the receive
        # callback, with no task woken for it.
        assert in_task == [True, False]
        again = await http.post(engine.url + "/v1/completions", json={"stream": True})
        assert again.content == b"data: first\n\ndata: second\n\n" + b"x" * 300
    assert engine.connections == 1  # pushed to the end, so reused


async def test_a_pushed_answer_framed_by_its_length_is_passed_on_whole():
    async def answer(n, writer):
        writer.write(sized(b'{"ok": true}'))

    async with ScriptedEngine(answer) as engine, client() as http:
        got = []
        async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
            assert await http.push(response, got.append) == b""
        assert got == [b'{"ok": true}']


async def test_a_pushed_stream_that_keeps_coming_within_the_read_timeout_does_not_time_out():
    async def answer(n, writer):
        writer.write(STREAM_HEAD)
        for i in range(6):  # 1.2 s in all, each part within the 0.3 s read timeout
            await asyncio.sleep(0.2)
            writer.write(chunk(b"t%d " % i))
            await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")

    async with ScriptedEngine(answer) as engine, client(read=0.3) as http:
        got = []
        async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
            assert await http.push(response, got.append) == b""  # the end came alone
        assert b"".join(got) == b"t0 t1 t2 t3 t4 t5 "


@pytest.mark.parametrize("rest, error", [
    (b"zz\r\n", httpx.RemoteProtocolError),  # broken chunked coding
    (b"close", httpx.RemoteProtocolError),  # the engine closes mid-answer
    (b"stall", httpx.ReadTimeout),  # the engine stops sending
])
async def test_a_pushed_stream_that_breaks_fails_as_iterating_it_would(rest, error):
    async def answer(n, writer):
        if n > 1:
            writer.write(sized(b"ok"))
            return
        writer.write(STREAM_HEAD + chunk(b"data: a\n\n"))
        await writer.drain()
        await asyncio.sleep(0.1)
        if rest == b"close":
            return "close"
        if rest == b"stall":
            await asyncio.sleep(30)
        writer.write(rest)
        await writer.drain()
        await asyncio.sleep(30)

    async with ScriptedEngine(answer) as engine, client(read=0.5) as http:
        got = []
        async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
            with pytest.raises(error) as raised:
                await asyncio.wait_for(http.push(response, got.append), timeout=5)
        assert raised.value.request is response.request
        assert got == [b"data: a\n\n"]
        assert (await http.post(engine.url + "/x", content=b"{}")).content == b"ok"
    assert engine.connections == 2  # the broken connection was not kept


async def test_a_writer_that_fails_stops_the_push_and_the_connection_is_closed():
    async def answer(n, writer):
        writer.write(STREAM_HEAD)
        for _ in range(100):
            await asyncio.sleep(0.02)
            writer.write(chunk(b"token"))
            await writer.drain()

    def write(part):
        raise RuntimeError("the caller is gone")

    async with ScriptedEngine(answer) as engine, client() as http:
        async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
            with pytest.raises(RuntimeError, match="the caller is gone"):
                await asyncio.wait_for(http.push(response, write), timeout=5)
        await asyncio.wait_for(engine.closed.wait(), timeout=5)


async def test_cancelling_a_push_mid_stream_is_a_cancellation_and_closing_stops_the_engine():
    async def answer(n, writer):
        writer.write(STREAM_HEAD)
        for _ in range(200):
            writer.write(chunk(b"token"))
            await writer.drain()
            await asyncio.sleep(0.02)

    async with ScriptedEngine(answer) as engine, client(read=0.3) as http:
        got = []

        async def push_all():
            async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
                await http.push(response, got.append)

        pushing = asyncio.create_task(push_all())
        await asyncio.sleep(0.5)  # longer than the read timeout: a timer that fired would show here
        pushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pushing
        assert len(got) > 5 and set(got) == {b"token"}
        await asyncio.wait_for(engine.closed.wait(), timeout=5)
        count = len(got)
        await asyncio.sleep(0.1)
        assert len(got) == count  # nothing is written on once the push is over


async def test_calls_on_a_kept_alive_connection_make_no_timer_each_and_a_read_still_times_out():
    async def answer(n, writer):
        if n <= 30:
            writer.write(sized(b"ok") if n % 3 else STREAM_HEAD + chunk(b"data: a\n\n") + b"0\r\n\r\n")
        else:
            await asyncio.sleep(30)  # then silent

    loop = asyncio.get_running_loop()
    timers = []
    call_at = loop.call_at

    def counting_call_at(when, callback, *args, **kwargs):
        timers.append(callback)
        return call_at(when, callback, *args, **kwargs)

    async with ScriptedEngine(answer) as engine, client(read=0.3) as http:
        assert (await http.post(engine.url + "/x", content=b"{}")).content == b"ok"
        loop.call_at = counting_call_at
        try:
            for n in range(2, 31):
                if n % 3:
                    response = await http.post(engine.url + "/x", content=b"{}")
                    assert response.content == b"ok"
                else:  # streamed: iterated, then pushed
                    async with http.stream("POST", engine.url + "/x", content=b"{}") as response:
                        got = []
                        if n % 2:
                            async for part in response.aiter_raw():
                                got.append(part)
                        else:  # all of it came with the end: returned, not written
                            got.append(await http.push(response, got.append))
                    assert got == [b"data: a\n\n"]
        finally:
            loop.call_at = call_at
        assert engine.connections == 1
        assert len(timers) <= 1, f"{len(timers)} timers for 29 calls"
        # Idle for longer than the read timeout, then a call the engine never answers: it still
        # times out, on the same connection.
        await asyncio.sleep(0.5)
        started = loop.time()
        with pytest.raises(httpx.ReadTimeout):
            await asyncio.wait_for(http.post(engine.url + "/x", content=b"{}"), timeout=5)
        assert 0.25 < loop.time() - started < 2
        assert engine.connections == 1

"""The hub's HTTP/1.1 connection to engines: an httpx transport with a lean keep-alive pool.

The gateway talks to engines through `httpx.AsyncClient`, as the rest of the code and the docs
expect, but below it sits this transport instead of httpcore. Engines are plain HTTP/1.1
servers on the node network, and httpcore's generality (anyio, h11's event machine, TLS,
proxies, HTTP/2) cost about 0.3 ms of CPU per call here, measured against bench/stub_engine.py,
where the same exchange over asyncio streams costs 0.04 ms. What it does:
- one idle list of connections per (host, port), reused LIFO; a connection is returned only
  after its response was read to the end, otherwise it is closed; at most
  MAX_CONNECTIONS_PER_HOST in use at once, the rest wait (httpx's pool timeout applies);
- bodies framed by Content-Length, chunked transfer-coding, or the connection's end;
- a reused connection that the engine had already closed (restart, idle timeout) fails before
  any byte of the answer: the request is sent again once on a fresh connection;
- httpx's timeouts (connect, read, write) and its exceptions, so callers catch
  `httpx.TransportError` as before. Closing a response early, or cancelling the task reading
  it, closes the connection: the engine sees the client go away and stops generating;
- a chunked answer can also be pushed (EngineClient.push): each part goes to a writer straight
  from the connection's receive callback, with no task or generator resumed per part.
EngineClient is the `httpx.AsyncClient` the gateway uses over it, without a cookie jar.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import httpx
from httpx._client import USE_CLIENT_DEFAULT, ClientState, UseClientDefault

MAX_IDLE_PER_HOST = 64
MAX_CONNECTIONS_PER_HOST = 2000  # past it, requests queue for a connection (httpx's pool did too)
READ_SIZE = 65_536
RECEIVE_BUFFER = 16_384  # per open connection: a streamed token is a few hundred bytes
MAX_HEAD_BYTES = 65_536

T = TypeVar("T")


class _Connection:
    __slots__ = ("reader", "writer", "used", "deadline")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.used = False
        self.deadline = _ReadDeadline()

    @property
    def protocol(self) -> _ReceivingProtocol | None:
        protocol = self.writer.transport.get_protocol()
        return protocol if isinstance(protocol, _ReceivingProtocol) else None

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.deadline.close()
        self.writer.close()


class _Chunks:
    """Decodes chunked transfer-coding as bytes arrive. Every chunk already here comes out in one
    piece: a hub that fell behind on a stream (32 streams at once, say) catches up with one write
    to its caller instead of one per token, and a hub that keeps up passes each chunk on alone."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        """The data of every whole chunk received so far and not yet returned (b"" if none)."""
        if self.buffer:  # the rest of a chunk begun before
            buf = self.buffer
            buf += data
        else:  # usually whole chunks: read them where they are, with no copy into the buffer and out
            buf = bytes(data)
        parts, pos = [], 0
        while not self.finished:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                if len(buf) - pos > MAX_HEAD_BYTES:
                    raise ValueError("chunk size line too long")
                break
            size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
            if size < 0:
                raise ValueError(f"negative chunk size {size}")
            start = line_end + 2
            if size == 0:  # the last chunk, then trailer lines up to an empty one
                if buf[start:start + 2] == b"\r\n":
                    pos, self.finished = start + 2, True
                    break
                trailers_end = buf.find(b"\r\n\r\n", start)
                if trailers_end < 0:
                    if len(buf) - start > MAX_HEAD_BYTES:
                        raise ValueError("chunked trailers too long")
                    break
                pos, self.finished = trailers_end + 4, True
                break
            if len(buf) < start + size + 2:
                break
            if buf[start + size:start + size + 2] != b"\r\n":
                raise ValueError("a chunk is not followed by CRLF")
            parts.append(bytes(buf[start:start + size]))
            pos = start + size + 2
        if buf is self.buffer:
            del buf[:pos]
        elif pos < len(buf):
            self.buffer += buf[pos:]
        return b"".join(parts)


class _ReadDeadline:
    """A connection's read timeout (httpx's: the longest wait for the engine's next bytes), kept
    with one timer per connection, moved on only when it fires. asyncio.timeout around each read
    made and cancelled a timer for every read: three per call (the request's write, the answer's
    head, its body) and one per streamed token. Here a read only notes when it started; if the
    timer finds a read waiting for that long, it cancels the reading task, and the read raises
    TimeoutError. Time the caller spends between reads (sending the last token on) does not count,
    and a connection idle in the pool lets its timer lapse."""

    __slots__ = ("loop", "timeout_s", "task", "since", "reading", "expired", "cancelling", "timer")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout_s, self.task, self.timer = None, None, None
        self.since, self.reading, self.expired, self.cancelling = 0.0, False, False, 0

    async def wait(self, read: Awaitable[T], timeout_s: float | None) -> T:
        """`await read` (a read of this connection), failing with TimeoutError if it waits
        `timeout_s` for bytes (`arrived` moves that on while it waits)."""
        if timeout_s is None:
            return await read
        self.task, self.since, self.reading, self.expired = asyncio.current_task(), self.loop.time(), True, False
        self.timeout_s = timeout_s
        if self.timer is None:
            self.timer = self.loop.call_at(self.since + timeout_s, self._check)
        elif self.timer.when() > self.since + timeout_s:  # a shorter timeout than the last read's
            self.timer.cancel()
            self.timer = self.loop.call_at(self.since + timeout_s, self._check)
        try:
            return await read
        except asyncio.CancelledError:
            if self.expired and self.task.uncancel() <= self.cancelling:
                raise TimeoutError from None  # our cancellation, and nobody else's
            raise
        finally:
            self.reading, self.task = False, None  # (a pooled connection must not keep the task alive)

    def arrived(self) -> None:
        self.since = self.loop.time()

    def _check(self) -> None:
        self.timer = None
        if not self.reading or self.expired:
            return  # the next read starts the timer again
        if self.loop.time() - self.since >= self.timeout_s:
            self.expired = True
            self.cancelling = self.task.cancelling()
            self.task.cancel()
            return
        self.timer = self.loop.call_at(self.since + self.timeout_s, self._check)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Push:
    """A chunked body handed to `write` part by part from the connection's receive callback, as it
    arrives; `done` ends with the body (its result: the data that came with the body's end, not
    written), or with what broke it. Each arrival moves the connection's read deadline on."""

    __slots__ = ("write", "chunks", "deadline", "done")

    def __init__(self, write: Callable[[bytes], object], deadline: _ReadDeadline) -> None:
        self.write, self.chunks, self.deadline = write, _Chunks(), deadline
        self.done = deadline.loop.create_future()

    def received(self, data) -> None:
        if self.done.done():
            return
        self.deadline.arrived()
        try:
            part = self.chunks.feed(data)
            if self.chunks.finished:
                self._end(None, part)
            elif part:
                self.write(part)
        except Exception as exc:  # broken chunked coding, or whatever `write` raised
            self._end(exc)

    def ended(self, exc: BaseException | None) -> None:
        """The connection closed, or the engine ended its side."""
        if not self.done.done():
            self._end(exc or asyncio.IncompleteReadError(bytes(self.chunks.buffer), None))

    def _end(self, exc: BaseException | None, last: bytes = b"") -> None:
        if exc is None:
            self.done.set_result(last)
        else:
            self.done.set_exception(exc)


class _Body(httpx.AsyncByteStream):
    """A response body read straight off the connection, then handed back to the pool."""

    def __init__(self, transport: EngineTransport, key: tuple[str, int], conn: _Connection, *,
                 length: int | None, chunked: bool, keep_alive: bool, read_timeout_s: float | None,
                 slot: asyncio.Semaphore) -> None:
        self.transport, self.key, self.conn, self.slot = transport, key, conn, slot
        self.length, self.chunked, self.keep_alive = length, chunked, keep_alive
        self.read_timeout_s = read_timeout_s
        self.done = length == 0
        self.released = False
        # What the answer's head said, noted as it was read: looking a header up in the response's
        # httpx.Headers decodes and scans all of them, each time.
        self.content_type: bytes | None = None
        self.encoded = False

    _BROKEN = (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._chunked() if self.chunked else self._plain():
                yield part
        except self._BROKEN as exc:
            raise self._failure(exc) from exc
        self._release()

    def _read(self, size: int) -> Awaitable[bytes]:
        return self.conn.deadline.wait(self.conn.reader.read(size), self.read_timeout_s)

    async def push(self, write: Callable[[bytes], object]) -> bytes:
        """Hands the body to `write` part by part, as `async for part in body` would, but from the
        connection's receive callback: no task wakes up and no generator resumes per part, which
        was about half of the hub's CPU per streamed token. Returns the data that came with the
        body's end, unwritten, for the caller to send with its own end (one send, not two). Raises
        as iterating would; cancelling the caller leaves the body unread (closing it then closes
        the connection)."""
        protocol = self.conn.protocol
        if not self.chunked or self.done or protocol is None or protocol.push is not None:
            async for part in self:
                write(part)
            return b""
        relay = _Push(write, self.conn.deadline)
        protocol.push = relay
        try:
            reader = self.conn.reader
            if reader._buffer:  # what came with the head (asyncio has no public peek)
                early = bytes(reader._buffer)
                reader._buffer.clear()
                relay.received(early)
            if reader.at_eof():
                relay.ended(None)
            last = await self.conn.deadline.wait(relay.done, self.read_timeout_s)
        except self._BROKEN as exc:
            raise self._failure(exc) from exc
        finally:
            protocol.push = None
        if relay.chunks.buffer:
            self.keep_alive = False  # bytes past the end of the answer: do not reuse the connection
        self.done = True
        self._release()
        return last

    async def read_whole(self) -> bytes:
        """The whole body at once: one read when its length is known."""
        if self.chunked or not self.length:
            return b"".join([part async for part in self])
        try:
            data = await self.conn.deadline.wait(self.conn.reader.readexactly(self.length), self.read_timeout_s)
        except self._BROKEN as exc:
            raise self._failure(exc) from exc
        self.done = True
        self._release()
        return data

    def _failure(self, exc: BaseException) -> httpx.TransportError:
        self._discard()
        if isinstance(exc, TimeoutError):
            return httpx.ReadTimeout("The engine stopped sending its answer.")
        return httpx.RemoteProtocolError(f"The engine's answer broke off: {exc!r}")

    async def _plain(self) -> AsyncIterator[bytes]:
        left = self.length
        while left is None or left > 0:
            data = await self._read(READ_SIZE if left is None else min(READ_SIZE, left))
            if not data:
                if left is None:
                    break  # framed by the connection's end
                raise asyncio.IncompleteReadError(b"", left)
            if left is not None:
                left -= len(data)
            yield data
        self.done = True

    async def _chunked(self) -> AsyncIterator[bytes]:
        chunks = _Chunks()
        while not chunks.finished:
            data = await self._read(READ_SIZE)
            if not data:
                raise asyncio.IncompleteReadError(bytes(chunks.buffer), None)
            part = chunks.feed(data)
            if part:
                yield part
        if chunks.buffer:
            self.keep_alive = False  # bytes past the end of the answer: do not reuse the connection
        self.done = True

    def _release(self) -> None:
        if not self.released:
            self.released = True
            if self.done and self.keep_alive:
                self.transport._give_back(self.key, self.conn)
            else:
                self.conn.close()
            self.slot.release()

    def _discard(self) -> None:
        self.done = False
        self._release()

    async def aclose(self) -> None:
        self._release()


class EngineTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to engines over pooled keep-alive connections (plain http only)."""

    def __init__(self, *, max_idle_per_host: int = MAX_IDLE_PER_HOST,
                 max_connections_per_host: int = MAX_CONNECTIONS_PER_HOST) -> None:
        self.max_idle_per_host = max_idle_per_host
        self.max_connections_per_host = max_connections_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"Engines are reached over plain http, not {url.scheme}.")
        key = (url.host, url.port or 80)
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        timeouts = request.extensions.get("timeout", {})
        head = self._head(request, body)
        slot = await self._slot(key, timeouts.get("pool"))
        try:
            conn = self._take(key)
            if conn is not None:
                try:
                    return await self._exchange(key, conn, head + body, timeouts, slot)
                except _StaleConnection:
                    conn.close()  # and send it again on a fresh connection
                except BaseException:
                    conn.close()
                    raise
            conn = await self._connect(key, timeouts.get("connect"))
            try:
                return await self._exchange(key, conn, head + body, timeouts, slot)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            slot.release()  # no response holds it
            raise

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    # -- pool ------------------------------------------------------------------------------------

    async def _slot(self, key: tuple[str, int], timeout_s: float | None) -> asyncio.Semaphore:
        """A turn to use a connection to this engine; the response's body gives it back."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = asyncio.Semaphore(self.max_connections_per_host)
        if not slot.locked():
            await slot.acquire()  # free: returns at once
            return slot
        try:
            async with asyncio.timeout(timeout_s):
                await slot.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout(f"All {self.max_connections_per_host} connections to {key[0]}:{key[1]} "
                                    "stayed busy.") from exc
        return slot

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    def _give_back(self, key: tuple[str, int], conn: _Connection) -> None:
        conns = self._idle.setdefault(key, [])
        if len(conns) < self.max_idle_per_host and conn.usable():
            conns.append(conn)
        else:
            conn.close()

    @staticmethod
    async def _connect(key: tuple[str, int], timeout_s: float | None) -> _Connection:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await _open_connection(*key)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"Connecting to {key[0]}:{key[1]} timed out.") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"Cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from exc
        return _Connection(reader, writer)

    # -- one request -----------------------------------------------------------------------------

    @staticmethod
    def _head(request: httpx.Request, body: bytes) -> bytes:
        url = request.url
        lines = [b"%s %s HTTP/1.1" % (request.method.encode(), url.raw_path)]
        has_host = has_length = False
        for name, value in request.headers.raw:
            lower = name.lower()
            if lower == b"transfer-encoding":
                continue  # the body is sent whole, with its length
            has_host = has_host or lower == b"host"
            has_length = has_length or lower == b"content-length"
            lines.append(name + b": " + value)
        if not has_host:
            lines.append(b"Host: " + url.netloc)
        if not has_length and (body or request.method in ("POST", "PUT", "PATCH")):
            lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _exchange(self, key: tuple[str, int], conn: _Connection, payload: bytes,
                        timeouts: dict, slot: asyncio.Semaphore) -> httpx.Response:
        conn.writer.write(payload)
        try:
            if conn.writer.transport.get_write_buffer_size():  # the engine is not taking it all at once
                async with asyncio.timeout(timeouts.get("write")):
                    await conn.writer.drain()
            head = await conn.deadline.wait(conn.reader.readuntil(b"\r\n\r\n"), timeouts.get("read"))
        except TimeoutError as exc:
            raise httpx.ReadTimeout("The engine did not answer in time.") from exc
        except asyncio.IncompleteReadError as exc:
            if not exc.partial and conn.used:
                raise _StaleConnection from exc
            raise httpx.RemoteProtocolError("The engine closed the connection mid-answer.") from exc
        except ConnectionError as exc:
            if conn.used:
                raise _StaleConnection from exc
            raise httpx.ReadError(f"The connection to the engine failed: {exc!r}") from exc
        except asyncio.LimitOverrunError as exc:
            raise httpx.RemoteProtocolError("The engine's answer headers are too large.") from exc
        conn.used = True
        status, headers = _parse_head(head)
        length = chunked = content_type = None
        keep_alive, encoded = True, False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lower == b"connection":
                keep_alive = b"close" not in value.lower()
            elif lower == b"content-type":
                content_type = value
            elif lower == b"content-encoding":
                encoded = True
        if status in (204, 304) or 100 <= status < 200:
            length = 0
        if not chunked and length is None:
            keep_alive = False  # the body ends with the connection
        stream = _Body(self, key, conn, length=length, chunked=bool(chunked), keep_alive=keep_alive,
                       read_timeout_s=timeouts.get("read"), slot=slot)
        stream.content_type, stream.encoded = content_type, encoded
        return httpx.Response(status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"})


class _ReceivingProtocol(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """asyncio's stream protocol, receiving into one buffer per connection (asyncio otherwise makes
    a new 256 KiB bytes object per read, above glibc's mmap threshold). While a body is pushed
    (_Body.push), what arrives goes to its _Push instead of the stream reader."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._receive = memoryview(bytearray(RECEIVE_BUFFER))
        self.push: _Push | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receive

    def buffer_updated(self, nbytes: int) -> None:
        if self.push is not None:
            self.push.received(self._receive[:nbytes])
        else:
            self.data_received(self._receive[:nbytes])  # the reader copies it into its own buffer

    def eof_received(self) -> bool:
        if self.push is not None:
            self.push.ended(None)
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.push is not None:
            self.push.ended(exc)
        super().connection_lost(exc)


async def _open_connection(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio.open_connection, over _ReceivingProtocol."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES, loop=loop)
    protocol = _ReceivingProtocol(reader)
    transport, _ = await loop.create_connection(lambda: protocol, host, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class _StaleConnection(Exception):
    """A kept-alive connection the engine closed before reading the request."""


def _parse_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    try:
        version, status, *_ = lines[0].split(b" ", 2)
        if not version.startswith(b"HTTP/1."):
            raise ValueError(version)
        code = int(status)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.strip()))
    except ValueError as exc:
        raise httpx.RemoteProtocolError(f"The engine's answer is not HTTP/1.1: {lines[0][:80]!r}") from exc
    return code, headers


class _NoCookies(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        pass


_NO_COOKIES = _NoCookies()


class EngineClient(httpx.AsyncClient):
    """`httpx.AsyncClient` over EngineTransport, with no cookie jar and a lean `send`.

    One client serves every caller of the hub, so a cookie an engine set for one request would ride
    along on everyone else's. Engines set none; the jar only cost time: httpx builds urllib request
    and response copies of every exchange to look for Set-Cookie (about 5 % of the hub's CPU per call).

    `send` skips the layers an engine call never uses: the auth flow, the redirect loop, event hooks,
    mounts and the elapsed-time wrapper (async generators and lists per call, about a third of the
    client's time per call). A client given auth, redirects, hooks or mounts gets httpx's own `send`.
    Engines are asked for unencoded answers: streams pass through to callers as they came.
    """

    def __init__(self, *, transport: EngineTransport | None = None, **kwargs) -> None:
        headers = httpx.Headers(kwargs.pop("headers", None))
        headers.setdefault("Accept-Encoding", "identity")
        super().__init__(transport=transport or EngineTransport(), trust_env=False, headers=headers, **kwargs)
        self._json_headers: dict[tuple, tuple[httpx.URL, httpx.Headers]] = {}
        self._timeout_dict: tuple[httpx.Timeout | None, dict] = (None, {})

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies) -> None:
        if cookies:
            raise ValueError("the engine client keeps no cookies")

    def json_request(self, url: httpx.URL, payload: bytes) -> httpx.Request:
        """A POST of a JSON body, as `build_request` makes it (the same headers, in the same order,
        and the client's timeout). `httpx.Request(content=...)` normalizes and merges every header
        twice per call: about 11 µs, and several times that with the hub's caches cold between
        requests at one client, where the cost follows how much code and data a call touches. Here
        the headers that do not change are made once per engine URL and client headers."""
        key = (id(url), tuple(self._headers._list))  # the client's headers as they are now
        made = self._json_headers.get(key)
        if made is None or made[0] is not url:
            if len(self._json_headers) > 256:
                self._json_headers.clear()
            made = self._json_headers[key] = (url, httpx.Headers(
                [(b"Host", url.netloc), *self.headers.raw, (b"Content-Type", b"application/json")]))
        timeout = self.timeout
        if self._timeout_dict[0] is not timeout:
            self._timeout_dict = (timeout, timeout.as_dict())
        request = httpx.Request("POST", url, headers=made[1], stream=httpx.ByteStream(payload),
                                extensions={"timeout": self._timeout_dict[1]})
        request.headers["Content-Length"] = str(len(payload))
        request._content = payload  # what read() sets: `content` is there at once, as with content=...
        return request

    async def read(self, response: httpx.Response) -> bytes:
        """The whole body of a response sent with `stream=True`, then closes it. An engine's answer
        framed by its length comes off the connection in one read, not through httpx's decoding
        iterators (engines are asked for no encoding)."""
        stream = response.stream
        if isinstance(stream, _Body) and not stream.encoded:
            try:
                return await stream.read_whole()
            except httpx.RequestError as exc:
                exc.request = response.request
                raise
            finally:
                await response.aclose()
        return await response.aread()

    @staticmethod
    def content_type(response: httpx.Response, default: str) -> str:
        """The response's Content-Type, or `default`: response.headers.get("content-type", default),
        read from what this client's transport noted."""
        stream = response.stream
        if isinstance(stream, _Body):
            return stream.content_type.decode("latin-1") if stream.content_type is not None else default
        return response.headers.get("content-type", default)

    async def push(self, response: httpx.Response, write: Callable[[bytes], object]) -> bytes:
        """Hands the body of a response sent with `stream=True` to `write` part by part, as
        `async for part in response.aiter_raw()` would; a chunked answer straight from the
        connection's receive callback (_Body.push). Returns what came with the body's end, not
        written (b"" if nothing). The response stays open: close it after."""
        stream = response.stream
        if isinstance(stream, _Body):
            try:
                return await stream.push(write)
            except httpx.RequestError as exc:
                exc.request = response.request
                raise
        async for part in response.aiter_raw():
            write(part)
        return b""

    def _plain_send(self, auth, follow_redirects) -> bool:
        return ((auth is None or isinstance(auth, UseClientDefault)) and self._auth is None
                and follow_redirects is not True and not self.follow_redirects
                and not self._event_hooks["request"] and not self._event_hooks["response"] and not self._mounts)

    async def send(self, request: httpx.Request, *, stream: bool = False, auth=USE_CLIENT_DEFAULT,
                   follow_redirects=USE_CLIENT_DEFAULT) -> httpx.Response:
        if not self._plain_send(auth, follow_redirects):
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        self._state = ClientState.OPENED
        self._set_timeout(request)
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.RequestError as exc:
            exc.request = request
            raise
        response.request = request
        response.default_encoding = self._default_encoding
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response

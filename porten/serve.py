"""Start the hub: daphne, as `daphne` would, minus work it throws away.

    python -m porten.serve -b 127.0.0.1 -p 8000 porten.asgi:application   (daphne's own arguments)

Twisted, under daphne, parses every POST body sent as a form (urlencoded or multipart) into
`request.args`, which daphne never reads: it hands the raw body to the ASGI app. For every other
POST it still parses the Content-Type header through the `email` package, which builds header
classes at run time: about 8 % of the hub's CPU per /v1 call, measured with bench/stub_engine.py.
A large multipart upload was also parsed in memory before Django's size limit could refuse it.
Twisted's Request has a switch for this (parsePOSTFormSubmission); daphne does not pass it.
Twisted's HTTPFactory also formats a second access-log line per request into its own log, which
nothing here reads: daphne writes the access log operators see, and here writes its lines once the
hub is idle (when_idle), several at a time, instead of before each answer goes out.

Twisted also sends every write the slow way: it registers the socket with epoll, waits for the next
loop turn to hear it is writable, sends, and unregisters it (two epoll_ctl calls, a loop wake-up and
a logging context per write). A stream writes once per token, so that was the largest single cost
per streamed chunk. Here a connection sends at the end of the loop turn in which it was written to
(all of that turn's writes in one send, as before: a response's headers and body go out together);
only what the socket will not take waits for epoll, with Twisted's back-pressure. An answer's end
goes out at once when it is written, before the clean-up after it, and a stream's parts are sent
as they come (SERVER_EXTENSION below). Accepted sockets also get TCP_NODELAY,
as asyncio gives every TCP socket: a token must not wait for the client to acknowledge the one before.

The server also offers the application plain calls (SERVER_EXTENSION): a start for a stream's
headers, a write for the parts of a started response, sent at once, through which the gateway
pushes a stream's tokens from the engine connection's receive callback (no ASGI message, task
wake-up or loop turn per token), and an end for its last part; a respond for a whole answer; and a
callback on the client's disconnect, in place of a task per request listening for it. start and
respond write the headers as one block, where daphne's and Twisted's handling of the ASGI messages
copied them into a sanitized Headers object first: at one client, the hub's time from the engine's
plain answer to its send went from 330-450 µs to 280-350 µs (p50s of three runs each).

A request's application task runs its first step as soon as the request is read, ahead of other
connections' reads in the same loop turn (_first_step_next). A connection's idle timeout is one
timer per connection (HTTPChannel below), not three timer changes per request.

Once the application and its URLconf are loaded (load_routes), its heap is frozen out of the
cycle collector's sight (settle_heap).
"""
from __future__ import annotations

import asyncio
import datetime
import gc
import inspect
import logging
import os
import selectors
import sys
import time


# An ASGI extension porten.serve offers in each HTTP scope, as {"start": ..., "write": ..., "end": ...,
# "respond": ..., "on_disconnect": ...}, plain calls from the event loop's thread (porten.gateway_handler
# uses them):
# - start(status, headers) sends a response's status and headers (bytes pairs, no Content-Length) at
#   once, its body to follow in chunks, as http.response.start and an empty body message would;
# - write(body) sends a part of a started response at once, as an http.response.body message with
#   more_body would;
# - end(body) sends the last part of a started response (b"" for none) with the response's end, at
#   once, as a last http.response.body message would;
# - respond(status, headers, body) sends a whole response at once, as an http.response.start message
#   and one last http.response.body message would; `headers` (bytes pairs) has no Content-Length;
# - on_disconnect(callback) has callback() called once if the client's connection is lost before
#   the response is finished (at once if it already was), as the http.disconnect message would be.
SERVER_EXTENSION = "porten.http"

logger = logging.getLogger(__name__)

IDLE_WORK_MAX_WAIT_S = 0.05  # the longest work handed to when_idle waits for an idle loop


class IdleSelector(selectors.DefaultSelector):
    """The hub's event-loop selector, which also runs the work handed to when_idle: when the loop
    is about to wait and nothing is ready (a request that has already arrived is read first), or
    once the work has waited IDLE_WORK_MAX_WAIT_S on a loop that is never idle."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_work: list = []
        self.idle_since = 0.0

    def select(self, timeout: float | None = None):
        if self.idle_work:
            if time.monotonic() - self.idle_since >= IDLE_WORK_MAX_WAIT_S:
                self.run_idle_work()
            elif timeout is None or timeout > 0:
                ready = super().select(0)
                if ready:
                    return ready
                self.run_idle_work()
        return super().select(timeout)

    def run_idle_work(self) -> None:
        work, self.idle_work = self.idle_work, []
        for callback in work:
            try:
                callback()
            except Exception:
                logger.exception("running %r once the hub was idle", callback)


def when_idle(callback) -> None:
    """Have callback() run once the running event loop has nothing ready to do, if it is porten.serve's
    (IdleSelector), or else on its next turn. For bookkeeping that should not come ahead of a
    request that has arrived: written at once, an access-log line cost about 60 µs with the caches
    cold, ahead of the client's next request."""
    loop = asyncio.get_running_loop()
    selector = getattr(loop, "_selector", None)
    if not isinstance(selector, IdleSelector):
        loop.call_soon(callback)
        return
    if not selector.idle_work:
        selector.idle_since = time.monotonic()
    selector.idle_work.append(callback)


def install_loop() -> None:
    """The hub's event loop, on an IdleSelector, as Twisted's reactor: daphne keeps an asyncio
    reactor it finds installed (and gives it the thread pool size in ASGI_THREADS, as it would its own).
    Where a reactor is installed already (importing daphne's server module installs one), it stays."""
    from concurrent.futures import ThreadPoolExecutor

    from twisted.internet import asyncioreactor

    if "twisted.internet.reactor" in sys.modules:
        return
    loop = asyncio.SelectorEventLoop(IdleSelector())
    if "ASGI_THREADS" in os.environ:
        loop.set_default_executor(ThreadPoolExecutor(max_workers=int(os.environ["ASGI_THREADS"])))
    asyncioreactor.install(loop)


def _call(function, *args, **kwargs):
    return function(*args, **kwargs)


def _send_now(transport) -> None:
    """Send what `transport` holds now, if it is a PromptServer (TLS wrappers are not)."""
    send_now = getattr(transport, "send_now", None)
    if send_now is not None:
        send_now()


def _first_step_next(task: asyncio.Task) -> None:
    """Run the first step of `task`, just made, next: ahead of whatever else the loop had ready.
    Many requests read in one loop turn (32 clients whose answers came back together) were each
    parsed and given a task, and only then did any task run: every request waited for the parsing
    of all of them before its engine was asked. Now each request goes as far as it can (to its
    engine, for a warm model) before the next one is read, as with Python 3.12's eager tasks."""
    ready = getattr(task.get_loop(), "_ready", None)
    if ready and getattr(ready[-1]._callback, "__self__", None) is task:
        ready.appendleft(ready.pop())


def _lean_daphne() -> None:
    from daphne import access, cli, http_protocol, server
    from twisted.internet import defer
    from twisted.python import deprecate
    from twisted.web import http

    class WebRequest(http_protocol.WebRequest):
        # daphne's own hash(id(self)) and id equality, without a Python call for each of the dozen
        # lookups of a request in the server's connection table per call (and one per streamed token).
        __hash__ = object.__hash__
        __eq__ = object.__eq__

        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("parsePOSTFormSubmission", False)
            super().__init__(*args, **kwargs)

        def _may_send(self, *, started: bool) -> bool:
            """Whether a SERVER_EXTENSION call may send: not once the connection is gone (daphne
            drops messages then), and daphne's ValueError for one out of turn (`started`: whether
            the response must have been started already)."""
            if self.finished or self.channel is None or self._disconnected:
                return False
            if self._response_started != started:
                raise ValueError("HTTP response has " + ("not yet" if started else "already") + " been started")
            return True

        def write_part(self, body: bytes) -> None:
            """The SERVER_EXTENSION's write: daphne's handling of a body message with more to come,
            and the part sent at once (a stream's token must not wait for the end of the turn)."""
            if not self._may_send(started=True):
                return
            if not body:
                return
            transport = self.channel.transport
            if self.chunked and self.startedWriting and hasattr(transport, "send_at_once"):
                self.sentLength += len(body)  # what Request.write does, in one send
                transport.send_at_once(b"%x\r\n%s\r\n" % (len(body), body))
                return
            http.Request.write(self, body)  # the headers first
            _send_now(transport)

        def end_part(self, body: bytes) -> None:
            """The SERVER_EXTENSION's end: the last part of a started response (b"" for none) and
            the response's end, sent together at once, as a last http.response.body message would be."""
            if not self._may_send(started=True):
                return
            if self.chunked and self.startedWriting:
                self.sentLength += len(body)  # what Request.write does, and finish's last chunk, in one send
                self.chunked = 0
                self._send_at_once(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n")
            elif body:
                http.Request.write(self, body)
            self.finish()
            self.log_complete()

        def _send_at_once(self, data: bytes) -> None:
            transport = self.channel.transport
            if hasattr(transport, "send_at_once"):
                transport.send_at_once(data)  # no send left for the end of the loop turn
            else:
                self.channel.write(data)

        def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
            """The SERVER_EXTENSION's start: a response's status and headers, sent at once, its body
            to follow in chunks (write, end), as an http.response.start message and an empty
            http.response.body message with more_body would."""
            if not self._may_send(started=False):
                return
            head = self._plain_head(status, headers, b"Transfer-Encoding: chunked\r\n\r\n") \
                if self.clientproto == b"HTTP/1.1" else None
            if head is None:
                self.handle_reply({"type": "http.response.start", "status": status, "headers": headers})
                self.handle_reply({"type": "http.response.body", "body": b"", "more_body": True})
                return
            self.startedWriting, self.chunked = 1, 1
            self._send_at_once(head)

        def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
            """The SERVER_EXTENSION's respond: a whole answer, as an http.response.start message and
            one last http.response.body message would be, framed by its length and sent at once."""
            if not self._may_send(started=False):
                return
            head = self._plain_head(status, headers, b"Content-Length: %d\r\n\r\n" % len(body))
            if head is None:
                self.handle_reply({"type": "http.response.start", "status": status, "headers": headers})
                self.handle_reply({"type": "http.response.body", "body": body})
                return
            self.startedWriting, self.sentLength = 1, len(body)
            self._send_at_once(head + body)
            self.finish()
            self.log_complete()

        def _plain_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> bytes | None:
            """The response's status line and headers as one block, ending with `framing` (its
            length or chunked coding) and the blank line, and the response marked started; where
            daphne and Twisted copy the headers into a sanitized Headers object, build the block
            from that and decide on the framing. None, with nothing changed, for what Twisted frames
            or cleans its own way: HEAD, 204/304, a Content-Length or a line break in `headers`."""
            lines = [b"".join((name, b": ", value, b"\r\n")) for name, value in headers]
            block = b"".join(lines)
            names = {name.lower() for name, _ in headers}
            if self.method == b"HEAD" or status in http.NO_BODY_CODES or b"content-length" in names \
                    or block.count(b"\n") != len(lines) or block.count(b"\r") != len(lines):
                return None
            self._response_started = True
            self.setResponseCode(status)
            head = [b"%s %d %s\r\n" % (self.clientproto, status, self.code_message)]
            for name, values in self.responseHeaders.getAllRawHeaders():  # Connection: close, when Twisted set it
                head.extend(b"".join((name, b": ", value, b"\r\n")) for value in values)
            head.append(block)
            server_name = self.server.server_name
            if server_name and b"server" not in names:
                head.append(b"Server: %s\r\n" % server_name.encode())
            head.append(framing)
            return b"".join(head)

        def log_complete(self) -> None:
            """daphne's access-log entry for a finished answer, as its handle_reply writes it."""
            try:
                uri = self.uri.decode("ascii")
            except UnicodeDecodeError:
                uri = repr(self.uri)  # as daphne: the path is malformed somehow
            try:
                self.server.log_action("http", "complete", {
                    "path": uri, "status": self.code, "method": self.method.decode("ascii", "replace"),
                    "client": "%s:%s" % tuple(self.client_addr) if self.client_addr else None,
                    "time_taken": self.duration(), "size": self.sentLength})
            except Exception:
                logger.exception("writing the access log")

        _disconnect_callback = None

        def on_disconnect(self, callback) -> None:
            """The SERVER_EXTENSION's on_disconnect."""
            if self._disconnected and not self.finished:
                callback()
            elif not self.finished:
                self._disconnect_callback = callback

        def connectionLost(self, reason) -> None:
            callback, self._disconnect_callback = self._disconnect_callback, None
            super().connectionLost(reason)
            if callback is not None:
                callback()

        def finish(self) -> None:
            self._disconnect_callback = None
            # The answer's end goes out first, then daphne's and Twisted's clean-up (the app's
            # disconnect message, the connection's next-request state, timers), which cost about
            # 0.2 ms with the caches cold and held the end back until it was done.
            if not self.finished and not self._disconnected and self.channel is not None:
                if not self.startedWriting:
                    self.write(b"")  # the headers, as Twisted's finish would
                if self.chunked:
                    self.channel.write(b"0\r\n\r\n")  # the last chunk, as Twisted's finish would
                    self.chunked = 0  # (written: finish must not write it again)
                _send_now(self.channel.transport)
            super().finish()

    class Server(server.Server):
        def create_application(self, protocol, scope):
            if scope.get("type") == "http" and isinstance(protocol, WebRequest):
                scope["extensions"] = {**scope.get("extensions", {}), SERVER_EXTENSION: {
                    "start": protocol.start, "write": protocol.write_part, "end": protocol.end_part,
                    "respond": protocol.respond, "on_disconnect": protocol.on_disconnect}}
            queue = super().create_application(protocol, scope)
            task = self.connections.get(protocol, {}).get("application_instance")
            if task is not None:
                _first_step_next(task)
                if isinstance(protocol, WebRequest):
                    task.add_done_callback(lambda _: self._forget_answered(protocol))
            return queue

        def protocol_disconnected(self, protocol) -> None:
            if protocol not in self.connections:
                return  # over and forgotten already (a lost connection after the end, say)
            super().protocol_disconnected(protocol)
            if isinstance(protocol, WebRequest):
                self._forget_answered(protocol)

        def _forget_answered(self, protocol) -> None:
            """What daphne's application_checker does for an HTTP request that is over (answered or
            gone) and whose application has returned, at once. The checker runs once a second, so
            the connection table held every request of the last second (some 900 at 32 streams),
            and that growth set off the cycle collector: 13 passes in 4,000 streams, 9 of them
            pauses of 2-9 ms for every call in flight; none now. An application that failed stays
            for the checker, which logs the error."""
            details = self.connections.get(protocol)
            if details is None or "disconnected" not in details:
                return
            task = details.get("application_instance")
            if task is not None and task.done() and (task.cancelled() or task.exception() is None):
                del self.connections[protocol]

    class HTTPChannel(http.HTTPChannel):
        """Twisted's HTTP connection, with its idle timeout kept as one timer per connection, moved on
        only when it fires. Twisted's resets it on every receive and stops and restarts it around
        every request: three timer changes per request, each a cancelled asyncio timer and a new one
        (5-7 % of the hub's CPU per /v1 call, measured in an A/B). Here those are a clock reading or less; when the
        timer fires with the connection not idle for the whole period, it waits for the rest."""

        clock = staticmethod(time.monotonic)
        _idle_timer = None
        _active_at = 0.0

        def resetTimeout(self) -> None:
            self._active_at = self.clock()

        def setTimeout(self, period):
            previous, self.timeOut = self.timeOut, period
            if period is not None:
                self._active_at = self.clock()
                if self._idle_timer is None:
                    self._idle_timer = self.callLater(period, self._idle_check)
            return previous

        def _idle_check(self) -> None:
            self._idle_timer = None
            if self.timeOut is None:
                return  # a request is being answered (its end sets the timeout again), or the connection is gone
            left = self._active_at + self.timeOut - self.clock()
            if left > 0:
                self._idle_timer = self.callLater(left, self._idle_check)
            else:
                self.timeoutConnection()

        def connectionLost(self, reason) -> None:
            super().connectionLost(reason)
            if self._idle_timer is not None and self._idle_timer.active():
                self._idle_timer.cancel()
            self._idle_timer = None

    class HTTPFactory(http_protocol.HTTPFactory):
        def protocol(self):
            return http._GenericHTTPChannelProtocol(HTTPChannel())

        def log(self, request) -> None:
            pass  # daphne's own access log (--access-log, stdout by default) is the one operators read

    class AccessLogGenerator(access.AccessLogGenerator):
        """daphne's access log, its lines written once the hub is idle (when_idle), several at a
        time: not ahead of a request that has already arrived. A line's time is when it is
        written, at most IDLE_WORK_MAX_WAIT_S late (the log shows whole seconds); what is pending
        when the server stops is written then. The lines are daphne's; its answered HTTP requests
        are formatted here, the date once per second, and written in one call."""

        def __init__(self, stream) -> None:
            super().__init__(stream)
            self._pending: list[tuple] = []
            # (a second since the epoch, that second as daphne's lines show it), formatted once: a
            # date's formatting reads the time zone (a stat of /etc/localtime) each time
            self._date: tuple[int | None, str] = (None, "")
            from twisted.internet import reactor

            reactor.addSystemEventTrigger("before", "shutdown", self.flush)

        def __call__(self, protocol, action, details) -> None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return super().__call__(protocol, action, details)
            if not self._pending:
                when_idle(self.flush)
            self._pending.append((protocol, action, details))

        def flush(self) -> None:
            pending, self._pending = self._pending, []
            try:
                second = int(time.time())
                if self._date[0] != second:
                    self._date = (second, datetime.datetime.fromtimestamp(second).strftime("%d/%b/%Y:%H:%M:%S"))
                date = self._date[1]
                lines = []
                for protocol, action, details in pending:
                    if protocol == "http" and action == "complete":  # daphne's write_entry, for it
                        lines.append('%s - - [%s] "%s %s" %s %s\n' % (
                            details["client"], date, details["method"], details["path"], details["status"] or "-",
                            details["size"] or "-"))
                        continue
                    if lines:
                        self.stream.write("".join(lines))
                        lines = []
                    super().__call__(protocol, action, details)
                if lines:
                    self.stream.write("".join(lines))
            except Exception:
                logger.exception("writing the access log")

    # daphne's WebRequest.process is an @inlineCallbacks generator whose one yield waits on
    # maybeDeferred(self.server.create_application, ...), a synchronous call. Run it as a plain
    # generator: without the three Deferreds and the context copy inlineCallbacks makes per request.
    steps = getattr(http_protocol.WebRequest.process, "__wrapped__", None)
    if inspect.isgeneratorfunction(steps) and http_protocol.maybeDeferred is defer.maybeDeferred:
        http_protocol.maybeDeferred = _call

        def process(self) -> None:
            run = steps(self)
            try:
                run.send(next(run))  # the application's input queue, back to daphne
            except StopIteration:
                return
            run.close()
            raise RuntimeError("daphne's WebRequest.process waited on more than create_application")

        WebRequest.process = process

    # daphne reaches twisted.web.http through the deprecation proxy Twisted installs in its place,
    # which runs Python code for every attribute: four calls for each `http.Request.write` daphne
    # makes per message (once per streamed token). Give daphne the module itself.
    if isinstance(http_protocol.http, deprecate._ModuleProxy):
        http_protocol.http = deprecate._InternalState(http_protocol.http)._module
    # daphne builds its factory, and the factory each connection's requests, from these module names.
    http_protocol.WebRequest = WebRequest
    server.HTTPFactory = HTTPFactory
    cli.AccessLogGenerator = AccessLogGenerator
    cli.CommandLineInterface.server_class = Server


def _prompt_server() -> None:
    from twisted.internet import tcp
    from twisted.python import log

    class PromptServer(tcp.Server):
        """An accepted TCP connection that sends what it is given without waiting for epoll."""

        _send_due = False

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.setTcpNoDelay(True)
            # Each request asks for both ends of its connection (Twisted's Request does, on every
            # request): a getsockname call and two validated address objects each time, for
            # addresses that cannot change while the connection lasts.
            self._host, self._peer = super().getHost(), super().getPeer()

        def getHost(self):
            return self._host

        def getPeer(self):
            return self._peer

        def write(self, data: bytes) -> None:
            if self.TLS:  # TLS started on this socket (daphne's ssl: endpoints wrap the protocol instead)
                return super().write(data)
            if not self.connected or self._writeDisconnected or not data:
                return
            self._tempDataBuffer.append(data)
            self._tempDataLen += len(data)
            self._maybePauseProducer()
            self._send_soon()

        def writeSequence(self, iovec) -> None:
            if self.TLS:
                return super().writeSequence(iovec)
            self.write(b"".join(iovec))  # doWrite joins the buffer into one send anyway

        def _send_soon(self) -> None:
            if not self._send_due and self not in self.reactor._writers:
                self._send_due = True
                self.reactor._asyncioEventloop.call_soon(self.send_now)

        def send_at_once(self, data: bytes) -> None:
            """write(data) and send it now: one send call when nothing is waiting to go out."""
            if self.TLS or self._tempDataLen or self.dataBuffer or not self.connected or self._writeDisconnected \
                    or self.producer is not None and self.producerPaused:
                self.write(data)
                return self.send_now()
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0  # write and send_now then handle it as Twisted does (a full buffer, a lost peer)
            if sent < len(data):
                self.write(data[sent:])
                self.send_now()

        def send_now(self) -> None:
            """Send what is buffered; what the socket will not take now waits for epoll."""
            self._send_due = False
            pending = self._tempDataLen or len(self.dataBuffer) - self.offset
            if not pending or not self.connected or self in self.reactor._writers:
                return
            try:
                why = self.doWrite()  # what the reactor calls once epoll says writable
            except Exception as exc:
                log.err(None, "sending on a connection")
                why = exc
            if why:
                self.reactor._disconnectSelectable(self, why, False)
            elif self._tempDataLen or self.offset < len(self.dataBuffer):
                self.startWriting()

    tcp.Port.transport = PromptServer


# Young objects collected per cycle-collector pass. A request leaves no cycles behind (see
# porten.gateway_handler), so the default 700 only made the collector walk the objects of the
# requests in flight, about a hundred times per thousand requests.
GC_THRESHOLD = (10_000, 10, 10)


def load_routes() -> None:
    """Import the URLconf, and with it every view and what they import, before settle_heap.
    Django loads it on the first request (the health check, usually), so some 180 modules (the
    gateway, the engine client, the API views, psycopg through django.contrib.postgres) were born
    after the freeze. Their objects sat in the cycle collector's middle generation and made each
    of its passes take 9-15 ms, a stall for every call in flight; now none takes over 1.2 ms."""
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 (imports the URLconf and, through include(), every app's)


def settle_heap() -> None:
    """Once the application is loaded: move everything it allocated (Django, the URLconf, models,
    Twisted) out of the cycle collector's sight. A full collection walked those ~130,000 objects
    every few hundred requests, stopping the hub for 50-75 ms each time; now it walks what
    requests allocate, and runs far less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def main(argv: list[str] | None = None) -> None:
    install_loop()
    _lean_daphne()
    _prompt_server()
    from daphne.cli import CommandLineInterface

    class Launcher(CommandLineInterface):
        def load_asgi_app(self, asgi_app_path: str):
            application = super().load_asgi_app(asgi_app_path)
            load_routes()
            settle_heap()
            return application

    Launcher().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()

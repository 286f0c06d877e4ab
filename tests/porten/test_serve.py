"""The hub launcher (python -m porten.serve): daphne with Twisted's unused form parsing and its
second access log turned off, and connections that send without waiting for epoll, checked in a
fresh interpreter as the launcher runs; and a live hub started through it answers form bodies with a
clear 400."""
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def checked(script: str) -> str:
    """What `script` printed, run in a fresh interpreter as the launcher would (it patches daphne
    and Twisted for the whole process); it must exit cleanly."""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()

CHECK = textwrap.dedent("""
    from unittest import mock

    from daphne import http_protocol, server
    from twisted.web import http

    assert http_protocol.WebRequest(mock.Mock())._parsePOSTFormSubmission is True  # daphne's default

    from porten.serve import _lean_daphne

    _lean_daphne()
    assert type(http_protocol.http) is type(mock), "daphne still reaches Twisted through its deprecation proxy"
    assert http_protocol.http.Request is http.Request
    request = http_protocol.WebRequest(mock.Mock())
    assert request._parsePOSTFormSubmission is False, "Twisted would still parse form bodies"
    other = http_protocol.WebRequest(mock.Mock())
    assert request == request and request != other and len({request, other, request}) == 2
    assert type(request).__hash__ is object.__hash__, "a Python __hash__ per connection-table lookup"
    # daphne's process runs as a plain generator: the request reaches the application at once,
    # with no Deferred in between, and a failing create_application is still daphne's 500.
    import io
    from twisted.internet import address
    from twisted.web.http_headers import Headers

    def refused(call, *args):  # whether call(*args) raised the ValueError daphne raises for a message out of turn
        try:
            call(*args)
        except ValueError:
            return True
        return False

    def made_request():
        made = http_protocol.WebRequest(mock.Mock())
        made.requestHeaders = Headers({b"content-type": [b"application/json"]})
        made.method, made.path, made.uri, made.clientproto = b"POST", b"/v1/x", b"/v1/x?a=1", b"HTTP/1.1"
        made.content = io.BytesIO(b"{}")
        made.client = made.host = address.IPv4Address("TCP", "127.0.0.1", 9)
        made.isSecure = lambda: False
        made.server.proxy_forwarded_address_header, made.server.root_path = None, ""
        made.server.request_buffer_size = 8192
        made.basic_error = mock.Mock()
        return made

    made = made_request()
    assert made.process() is None, "process still returns a Deferred"
    scope = made.server.create_application.call_args.args[1]
    assert (scope["path"], scope["query_string"], scope["method"]) == ("/v1/x", b"a=1", "POST")
    assert made.application_queue is made.server.create_application.return_value
    made.application_queue.put_nowait.assert_called_once_with({"type": "http.request", "body": b"{}", "more_body": False})
    assert not made.basic_error.called
    made = made_request()
    made.server.create_application.side_effect = RuntimeError("no application")
    made.process()
    assert made.basic_error.call_args.args[0] == 500
    # An answer's end is sent at once, before daphne's and Twisted's clean-up; a stream's last
    # chunk is written once.
    for chunked in (1, 0):
        made = made_request()
        made.application_queue, made.chunked, made.startedWriting = None, chunked, 1
        channel, order = made.channel, []
        channel.transport.send_now.side_effect = lambda: order.append("sent")
        channel.requestDone.side_effect = lambda request: order.append("cleaned up")
        made.finish()
        assert order == ["sent", "cleaned up"], order
        assert [c.args for c in channel.write.call_args_list] == ([(b"0\\r\\n\\r\\n",)] if chunked else [])
        assert made.finished
    # A streamed part goes out framed and at once, in one send; the first one with the headers.
    made = made_request()
    made._response_started = True
    made.write_part(b"hello")
    assert made.chunked and made.channel.writeHeaders.called
    made.channel.writeSequence.assert_called_once_with((b"5", b"\\r\\n", b"hello", b"\\r\\n"))
    made.channel.transport.send_now.assert_called_once_with()
    made.write_part(b"data: x\\n\\n")
    made.channel.transport.send_at_once.assert_called_once_with(b"9\\r\\ndata: x\\n\\n\\r\\n")
    assert made.sentLength == 5 + 9
    made._disconnected = True  # the client left: nothing more is written
    made.write_part(b"more")
    assert made.channel.transport.send_at_once.call_count == 1 and made.sentLength == 14
    assert refused(made_request().write_part, b"too early"), "a part before the response started was taken"
    # start: a stream's headers in one send, chunked; over HTTP/1.0, through daphne's messages.
    made = made_request()
    made.server.server_name = "daphne"
    channel = made.channel
    made.start(200, [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")])
    channel.transport.send_at_once.assert_called_once_with(
        b"HTTP/1.1 200 OK\\r\\nContent-Type: text/event-stream\\r\\nCache-Control: no-cache\\r\\n"
        b"Server: daphne\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n")
    assert made._response_started and made.startedWriting and made.chunked and not made.finished
    made.write_part(b"data: x\\n\\n")  # the parts follow, chunked
    assert channel.transport.send_at_once.call_args.args[0] == b"9\\r\\ndata: x\\n\\n\\r\\n"
    assert refused(made.start, 200, []), "a second start was taken"
    for proto, headers in ((b"HTTP/1.0", []), (b"HTTP/1.1", [(b"Content-Length", b"5")])):
        made = made_request()
        made.clientproto = proto
        made.handle_reply = mock.Mock()
        made.start(200, headers)
        assert [c.args[0] for c in made.handle_reply.call_args_list] == [
            {"type": "http.response.start", "status": 200, "headers": headers},
            {"type": "http.response.body", "body": b"", "more_body": True}]
        assert not made.channel.transport.send_at_once.called
    # end: a stream's last part and its end, in one send, logged as daphne logs it.
    for last, expected in ((b"last", b"4\\r\\nlast\\r\\n0\\r\\n\\r\\n"), (b"", b"0\\r\\n\\r\\n")):
        made = made_request()
        made.application_queue, made.client_addr = None, ["127.0.0.1", 9]
        made._response_started, made.startedWriting, made.chunked, made.sentLength = True, 1, 1, 5
        channel = made.channel
        made.end_part(last)
        channel.transport.send_at_once.assert_called_once_with(expected)
        assert not channel.write.called
        assert made.finished and made.sentLength == 5 + len(last)
        assert made.server.log_action.call_args.args[1:][0] == "complete"
    made = made_request()
    made._disconnected = True  # the client left: nothing is written
    made._response_started = True
    made.end_part(b"late")
    assert not made.channel.write.called and not made.channel.transport.send_at_once.called and not made.finished
    assert refused(made_request().end_part, b"too early"), "an end before the response started was taken"
    # respond: a whole answer in one write, framed by its length, sent at once and logged as
    # daphne logs it; with the Connection: close Twisted set when the client asked to close.
    made = made_request()
    made.application_queue, made.client_addr = None, ["127.0.0.1", 9]
    made.server.server_name = "daphne"
    made.responseHeaders.setRawHeaders(b"Connection", [b"close"])
    channel = made.channel  # (finish lets go of it)
    made.respond(200, [(b"Content-Type", b"application/json"), (b"X-Porten-Cold-Start", b"false")], b'{"a": 1}')
    channel.transport.send_at_once.assert_called_once_with(
        b"HTTP/1.1 200 OK\\r\\nConnection: close\\r\\nContent-Type: application/json\\r\\nX-Porten-Cold-Start: false\\r\\n"
        b"Server: daphne\\r\\nContent-Length: 8\\r\\n\\r\\n{\\"a\\": 1}")
    assert not channel.write.called
    assert made.finished and made.code == 200 and made.sentLength == 8 and not made.chunked
    action, details = made.server.log_action.call_args.args[1:]
    assert (action, details["path"], details["status"], details["size"]) == ("complete", "/v1/x?a=1", 200, 8)
    made = made_request()
    made.server.server_name = "daphne"
    made.application_queue, channel = None, made.channel
    made.respond(404, [(b"Server", b"other")], b"")
    assert channel.transport.send_at_once.call_args.args[0] == b"HTTP/1.1 404 Not Found\\r\\nServer: other\\r\\nContent-Length: 0\\r\\n\\r\\n"
    made.respond(200, [], b"twice")  # finished: ignored, as daphne ignores messages after the end
    assert channel.transport.send_at_once.call_count == 1
    made = made_request()
    made._response_started = True  # (by messages through daphne)
    assert refused(made.respond, 200, [], b"twice"), "a second start was taken"
    # What Twisted frames or cleans its own way goes through daphne's messages: a line break in a
    # header, a HEAD request, a 204.
    for method, status, headers in ((b"POST", 200, [(b"X-Evil", b"a\\r\\nSet-Cookie: x=1")]), (b"HEAD", 200, []),
                                    (b"POST", 204, [])):
        made = made_request()
        made.method, made.application_queue = method, None
        made.handle_reply = mock.Mock()
        made.respond(status, headers, b"body")
        assert [c.args[0]["type"] for c in made.handle_reply.call_args_list] == ["http.response.start",
                                                                               "http.response.body"]
        assert not made.channel.write.called and not made.channel.transport.send_at_once.called
    made = made_request()
    made._disconnected = True  # the client left: nothing is written
    made.respond(200, [], b"late")
    assert not made.channel.write.called and not made.channel.transport.send_at_once.called and not made.finished
    # The server offers that write to the application in each HTTP scope.
    import asyncio

    from daphne import access, cli
    from porten.serve import SERVER_EXTENSION

    seen = []

    async def app(scope, receive, send):
        seen.append(scope)

    hub = cli.CommandLineInterface.server_class.__new__(cli.CommandLineInterface.server_class)
    assert isinstance(hub, server.Server) and type(hub) is not server.Server
    made = made_request()
    hub.connections, hub.application = {made: {}}, app
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    hub.create_application(made, {"type": "http", "extensions": {"other": {}}})
    loop.run_until_complete(hub.connections[made]["application_instance"])
    offered = seen[0]["extensions"][SERVER_EXTENSION]
    assert seen[0]["extensions"]["other"] == {}
    assert offered == {"start": made.start, "write": made.write_part, "end": made.end_part, "respond": made.respond,
                       "on_disconnect": made.on_disconnect}
    # A new application runs its first step before whatever else the loop had ready (the next
    # connection's read), not after it.
    order = []

    async def first_step(scope, receive, send):
        order.append("application")

    def read():
        other = made_request()
        hub.connections[other], hub.application = {}, first_step
        loop.call_soon(order.append, "next read")
        hub.create_application(other, {"type": "http"})

    loop.call_soon(read)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert order == ["application", "next read"], order
    # A request that is over leaves the connection table once its application has returned, in
    # either order, not at daphne's checker a second later; one whose application failed stays
    # for the checker to log and answer.
    async def answers(scope, receive, send):
        await asyncio.sleep(0)

    async def fails(scope, receive, send):
        raise RuntimeError("broken")

    for application, over_first, kept in ((answers, False, False), (answers, True, False), (fails, False, True)):
        made = made_request()
        hub.connections, hub.application = {made: {}}, application
        hub.create_application(made, {"type": "http"})
        if over_first:
            hub.protocol_disconnected(made)
            assert made in hub.connections, "forgotten while its application still runs"
        loop.run_until_complete(asyncio.wait([hub.connections[made]["application_instance"]]))
        loop.run_until_complete(asyncio.sleep(0))
        assert made in hub.connections or over_first, "forgotten while the request still answers"
        hub.protocol_disconnected(made)  # the answer's end (or, after it, a lost connection)
        assert (made in hub.connections) == kept, (application, over_first)
    # on_disconnect: called back once if the connection is lost before the answer is finished,
    # at once if it already was, and never once the answer is finished.
    from twisted.internet import error
    from twisted.python import failure

    lost = failure.Failure(error.ConnectionLost())
    for finished_first in (False, True):
        made, called = made_request(), []
        made.application_queue = None
        made.on_disconnect(lambda: called.append("gone"))
        if finished_first:
            made.startedWriting = 1
            made.finish()
        made.connectionLost(lost)
        assert called == ([] if finished_first else ["gone"]), called
    made, called = made_request(), []
    made.application_queue = None
    made.connectionLost(lost)
    made.on_disconnect(lambda: called.append("gone"))
    assert called == ["gone"]
    factory = server.HTTPFactory(mock.Mock())
    assert isinstance(factory, http.HTTPFactory)
    factory._logFile = mock.Mock()
    factory.log(request)
    assert not factory._logFile.write.called, "Twisted would still write its own access log line"
    # Work handed to when_idle runs once the loop would wait with nothing ready: after a read that
    # is ready, not before it; on a loop that is never idle, after IDLE_WORK_MAX_WAIT_S.
    import socket
    import time

    from porten.serve import IDLE_WORK_MAX_WAIT_S, IdleSelector, when_idle

    idle_loop = asyncio.SelectorEventLoop(IdleSelector())
    order = []

    async def ready_read_first():
        ours, theirs = socket.socketpair()
        idle_loop.add_reader(ours, lambda: order.append("read") or ours.recv(10))
        theirs.send(b"x")
        when_idle(lambda: order.append("idle work"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # loop turns with something ready: the work waits
        order.append("turns")
        await asyncio.sleep(0.01)
        idle_loop.remove_reader(ours)
        ours.close(), theirs.close()

    idle_loop.run_until_complete(ready_read_first())
    assert order == ["read", "turns", "idle work"], order

    async def never_idle():
        ran, started = [], time.monotonic()
        when_idle(lambda: ran.append(time.monotonic() - started))
        while not ran and time.monotonic() - started < 1:
            await asyncio.sleep(0)
        return ran

    ran = idle_loop.run_until_complete(never_idle())
    assert ran and IDLE_WORK_MAX_WAIT_S <= ran[0] < IDLE_WORK_MAX_WAIT_S + 0.05, ran
    order.clear()

    async def elsewhere():  # on another loop: the next turn
        when_idle(lambda: order.append("next turn"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    loop.run_until_complete(elsewhere())
    assert order == ["next turn"]
    # daphne's access log: its lines written once the hub is idle, together, and what is pending
    # when the server stops, then.
    import io

    from twisted.internet import reactor

    stream = io.StringIO()
    access_log = cli.AccessLogGenerator(stream)
    assert isinstance(access_log, access.AccessLogGenerator) and type(access_log) is not access.AccessLogGenerator
    entry = {"client": "127.0.0.1:9", "method": "POST", "path": "/v1/x", "status": 200, "size": 8}

    async def answered(count):
        for _ in range(count):
            access_log("http", "complete", entry)
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # loop turns with something ready: not written yet
        written = stream.getvalue()
        await asyncio.sleep(0.01)
        return written

    assert idle_loop.run_until_complete(answered(3)) == ""
    assert stream.getvalue().count('"POST /v1/x" 200 8') == 3, stream.getvalue()
    access_log("http", "complete", entry)  # with no loop running: written at once
    assert stream.getvalue().count("\\n") == 4

    async def stopping():
        access_log("http", "complete", entry)
        reactor.fireSystemEvent("shutdown")

    idle_loop.run_until_complete(stopping())
    assert stream.getvalue().count("\\n") == 5, "a line pending at the stop was lost"
    # The lines are daphne's own, in order, a websocket entry among answered requests included.
    import re

    entries = [("http", "complete", entry), ("http", "complete", {**entry, "status": 404, "size": 0}),
               ("websocket", "connected", {"client": "127.0.0.1:9", "path": "/ws/x"}),
               ("http", "complete", {**entry, "client": None, "method": "GET"})]
    ours, daphnes = io.StringIO(), io.StringIO()
    access_log, daphne_log = cli.AccessLogGenerator(ours), access.AccessLogGenerator(daphnes)

    async def logged():
        for logged_entry in entries:
            access_log(*logged_entry)
            daphne_log(*logged_entry)
        await asyncio.sleep(0.01)

    idle_loop.run_until_complete(logged())
    undated = [re.sub(r"\\[[^]]*\\]", "[]", log.getvalue()) for log in (ours, daphnes)]
    assert undated[0] == undated[1] and undated[0].count("\\n") == 4, undated
    import datetime

    dates = [[datetime.datetime.strptime(date, "%d/%b/%Y:%H:%M:%S") for date in re.findall(r"\\[([^]]*)\\]", log.getvalue())]
             for log in (ours, daphnes)]
    assert len(dates[0]) == 4 and all(abs((a - b).total_seconds()) <= 1 for a, b in zip(*dates)), dates
    access_log._date = (0, "01/Jan/1970:00:00:00")  # a date formatted for another second is not reused

    async def one_more():
        access_log("http", "complete", entry)
        await asyncio.sleep(0.01)

    idle_loop.run_until_complete(one_more())
    assert ours.getvalue().count("\\n") == 5 and "1970" not in ours.getvalue(), ours.getvalue()
    print("lean")
""")


def test_the_launcher_turns_off_form_parsing_and_twisteds_access_log():
    assert checked(CHECK) == "lean"


PROMPT_CHECK = textwrap.dedent("""
    import asyncio

    from twisted.internet import asyncioreactor

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    from twisted.internet import protocol, reactor

    from porten.serve import _prompt_server

    _prompt_server()
    accepted, lost = [], []

    class Peer(protocol.Protocol):
        def connectionMade(self):
            accepted.append(self.transport)

        def connectionLost(self, reason):
            lost.append(reason.type.__name__)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Peer), interface="127.0.0.1")

    async def accept():
        reader, writer = await asyncio.open_connection("127.0.0.1", port.getHost().port)
        while len(accepted) < len(lost) + 1:
            await asyncio.sleep(0.01)
        return reader, writer, accepted[-1]

    async def main():
        reader, writer, server = await accept()
        assert type(server).__name__ == "PromptServer" and server.getTcpNoDelay()
        local = writer.get_extra_info("sockname")
        assert (server.getPeer().host, server.getPeer().port) == local  # the client's end
        assert server.getHost().port == port.getHost().port and server.getHost() is server.getHost()

        # Small writes in one turn go out in one send, without registering the socket with epoll.
        server.write(b"a")
        server.writeSequence([b"b", b"c"])
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"abc"
        assert server not in reactor._writers

        # send_at_once sends within the call, with no loop turn; behind unsent data, it waits its turn.
        server.send_at_once(b"now")
        assert not server._tempDataLen and not server.dataBuffer
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"now"
        server.write(b"first ")
        server.send_at_once(b"second")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"first second"

        # More than the socket takes: the rest waits for epoll and arrives whole and in order.
        big = bytes(range(256)) * 32 * 1024
        server.send_at_once(big)
        server.write(b"end")
        for _ in range(3):
            await asyncio.sleep(0)
        assert server in reactor._writers, "the unsent rest should wait for epoll"
        assert await asyncio.wait_for(reader.readexactly(len(big) + 3), 10) == big + b"end"
        await asyncio.sleep(0.05)
        assert server not in reactor._writers

        # A last write, then close: it is sent before the connection closes.
        server.write(b"bye")
        server.loseConnection()
        assert await asyncio.wait_for(reader.read(), 5) == b"bye"
        writer.close()

        # Writing to a client that went away loses the connection cleanly.
        reader, writer, server = await accept()
        writer.transport.abort()
        await asyncio.sleep(0.05)
        for _ in range(3):
            server.write(b"x" * 100_000)
            await asyncio.sleep(0.05)
        assert lost[-1] in ("ConnectionLost", "ConnectionDone"), lost
        print("prompt")

    loop.run_until_complete(main())
""")


def test_hub_connections_send_at_once_and_keep_back_pressure_and_closing_right():
    assert checked(PROMPT_CHECK) == "prompt"


IDLE_CHECK = textwrap.dedent("""
    from unittest import mock

    from daphne import http_protocol, server
    from twisted.internet import task
    from twisted.internet.testing import StringTransport
    from twisted.web import http

    from porten.serve import _lean_daphne

    _lean_daphne()
    clock, answering = task.Clock(), []
    timers_made = []

    def call_later(delay, function):
        timers_made.append(delay)
        return clock.callLater(delay, function)

    class Request(http.Request):
        def process(self):
            answering.append(self)

    factory = server.HTTPFactory(mock.Mock())
    factory.timeOut = 10
    connection = factory.buildProtocol(None)
    connection.requestFactory, connection.callLater = Request, call_later
    connection._channel.clock = clock.seconds
    transport = StringTransport()
    connection.makeConnection(transport)
    assert len(clock.getDelayedCalls()) == 1

    # Bytes keep the connection alive: at the timer's end, it waits for the rest of the period.
    clock.advance(6)
    connection.dataReceived(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n")
    clock.advance(4)
    assert not transport.disconnecting, "closed 4 s after the client last sent"
    assert [call.getTime() for call in clock.getDelayedCalls()] == [16]

    # A request being answered is never timed out, however long it takes.
    connection.dataReceived(b"\\r\\n")
    assert len(answering) == 1
    clock.advance(100)
    assert not transport.disconnecting, "timed out while answering"
    assert not clock.getDelayedCalls(), "a timer left running while answering"
    answering[0].finish()
    clock.advance(9)
    assert not transport.disconnecting, "timed out 9 s after the answer"

    # Many requests on the connection: no timer is made or stopped for them.
    made = len(timers_made)
    for _ in range(50):
        connection.dataReceived(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        answering[-1].finish()
    assert len(timers_made) == made, timers_made
    assert len(answering) == 51

    # Idle for the whole period: closed, as Twisted's own timeout closes it.
    clock.advance(10)
    assert transport.disconnecting, "an idle connection was kept open"

    # A lost connection leaves no timer behind.
    other = factory.buildProtocol(None)
    other.callLater = clock.callLater
    other._channel.clock = clock.seconds
    other.makeConnection(StringTransport())
    before = len(clock.getDelayedCalls())
    other.connectionLost(None)
    assert len(clock.getDelayedCalls()) == before - 1
    print("idle")
""")


def test_hub_connections_time_out_when_idle_with_one_timer_each_not_per_request():
    assert checked(IDLE_CHECK) == "idle"


HEAP_CHECK = textwrap.dedent("""
    import gc
    import sys

    from porten import serve

    serve.install_loop()  # as main does first; daphne's server module would install its own
    from daphne import cli
    from twisted.internet import reactor

    def run(self, argv):  # what daphne's run does first, without serving
        self.application = self.load_asgi_app(argv[-1])

    cli.CommandLineInterface.run = run
    assert gc.get_freeze_count() == 0
    serve.main(["porten.asgi:application"])
    assert gc.get_freeze_count() > 50_000, gc.get_freeze_count()  # Django, the URLconf, Twisted...
    assert gc.get_threshold() == serve.GC_THRESHOLD
    assert isinstance(reactor._asyncioEventloop._selector, serve.IdleSelector), "the hub's loop runs no idle work"
    assert "fleet.gateway" in sys.modules and "fleet.upstream" in sys.modules, "the URLconf is still loaded lazily"

    from django.urls import get_resolver

    loaded = set(sys.modules)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/public/v1/models/warming"):
        get_resolver().resolve(path)
    assert set(sys.modules) == loaded, sorted(set(sys.modules) - loaded)  # nothing left for a first request
    print("settled")
""")


def test_the_launcher_runs_its_loop_with_idle_work_loads_the_urlconf_and_freezes_the_application():
    assert checked(HEAP_CHECK) == "settled"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("form", ["urlencoded", "multipart"])
def test_a_form_body_on_the_live_hub_is_a_clear_400(live_hub, api_key, form):
    headers = {"Authorization": f"Bearer {api_key}"}
    if form == "urlencoded":
        response = httpx.post(live_hub.url + "/v1/chat/completions", data={"model": "m"}, headers=headers)
    else:
        response = httpx.post(live_hub.url + "/v1/chat/completions", files={"upload": b"x" * 10_000}, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in response.json()["error"]["message"]

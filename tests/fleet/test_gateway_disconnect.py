"""A caller who goes away stops the engine's work: through a live hub, the engine sees its
connection closed when the client disconnects mid-stream or before a plain answer, and what it
produced until then is still recorded as the key's usage."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from django.utils import timezone

from fleet.models import Instance, Node, Phase
from porten.models import UsageRecord
from porten.usage import usage_persist
from tests.fleet.conftest import offered


class SlowEngine:
    """An OpenAI-shaped engine on 127.0.0.1 that starts answering and then never finishes, and
    notes when the hub closes the connection."""

    def __init__(self) -> None:
        self.requests = 0
        self.closed = threading.Event()
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=5)

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        body = await reader.readexactly(length)
        self.requests += 1
        if b'"stream": true' in body or b'"stream":true' in body:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            data = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        self.ready.set()
        await reader.read()  # returns when the hub closes its end
        self.closed.set()
        writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


@pytest.fixture
def slow_engine(transactional_db, request):
    engine = SlowEngine()
    # A model id of its own per test: the live hub remembers each model's route for a second.
    engine.model_id = f"slow-{request.node.name[-40:]}"
    model = offered(engine.model_id)
    node = Node.objects.create(name=f"node-{engine.port}", last_heartbeat_at=timezone.now(),
                               gpus=[{"index": 0, "name": "cpu", "total_mb": 100_000, "free_mb": 100_000}])
    Instance.objects.create(model=model, node=node, phase=Phase.READY, port=engine.port, vram_mb=model.vram_mb,
                            ready_at=timezone.now())
    yield engine
    engine.close()


def _body(engine: SlowEngine, stream: bool) -> dict:
    return {"model": engine.model_id, "stream": stream, "messages": [{"role": "user", "content": "Hello"}]}


def test_a_client_leaving_mid_stream_closes_the_engine_connection(live_hub, api_key, slow_engine):
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.stream("POST", live_hub.url + "/v1/chat/completions", json=_body(slow_engine, True), headers=headers,
                      timeout=30) as response:
        assert response.status_code == 200
        first = next(response.iter_raw())
        assert b"Hi" in first  # the engine's first chunk came through before it finished
        assert not slow_engine.closed.is_set()
    # Leaving the block closed the client's connection mid-stream.
    assert slow_engine.closed.wait(10), "the engine kept generating for a caller who had left"
    assert slow_engine.requests == 1
    # What the engine produced until then is recorded (its one token; it sent no usage).
    deadline = time.monotonic() + 10
    while not (rows := list(UsageRecord.objects.filter(model_id=slow_engine.model_id))) and time.monotonic() < deadline:
        time.sleep(0.5)  # the hub writes its tallies to Redis within a second
        usage_persist()
    assert [(row.requests, row.completion_tokens) for row in rows] == [(1, 1)]


def test_a_client_leaving_before_a_plain_answer_closes_the_engine_connection(live_hub, api_key, slow_engine):
    headers = {"Authorization": f"Bearer {api_key}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_hub.url + "/v1/chat/completions", json=_body(slow_engine, False), headers=headers, timeout=1.5)
    assert slow_engine.ready.is_set()
    started = time.monotonic()
    assert slow_engine.closed.wait(10), "the engine kept working for a caller who had left"
    assert time.monotonic() - started < 10

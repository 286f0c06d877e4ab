"""A fast, deterministic OpenAI-compatible engine for benchmarks that must measure Porten alone.

python bench/stub_engine.py --port 9100 --token-delay-ms 2 --tokens 16 [--host H] [--slots N]
Answers GET /v1/models, GET /health, POST /v1/chat/completions and /v1/completions (stream or not)
with the same tokens every time, spaced by a fixed delay, over HTTP/1.1 keep-alive.

With --full-stream a streamed answer also opens with a role chunk (chat) and closes with a
finish_reason chunk, as llama.cpp's and vLLM's do, so that a client can check it is whole
(bench/soak.py); without it, only the content chunks and [DONE] are sent (the bytes the gateway
benches have always measured).

With --slots N it generates at most N answers at once, as llama.cpp's parallel slots do: a
completion beyond them waits inside the stub, in arrival order, and its token clock starts when
it gets a slot. Without it, every request is answered at once.

A streamed answer's tokens are due on a clock that starts when the request is read (the n-th
token n delays after it), as a real engine's are: its generation runs on the accelerator or in its own thread,
apart from the writes, so a write that is late does not make the later tokens late. Sleeping the
delay after each write instead would add every scheduling delay a proxy on the same cores causes
to all the tokens after it: on 2 shared cores the first-to-last token span grew from 32.2 ms
straight to the stub to 33.4 ms through bench/byte_pipe.py, a relay doing no work (30.2 and
30.3 ms on the clock), which put the relay itself at the 1.05 ratio Porten is held to.

The stub is kept cheap, because on a small machine it shares the cores with the proxy it
measures: each connection is a plain asyncio protocol, each token a timer that writes bytes made
once per (route, model, length), with no task, stream reader or JSON encoding per token
(docs/performance.md, "How the bench is built").

A stream asked for `stream_options: {"include_usage": true}` ends with a usage chunk, as
llama.cpp's and vLLM's do.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
MAX_HEAD_BYTES = 65_536
DONE = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(obj: dict) -> bytes:
    data = b"data: " + json.dumps(obj).encode() + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _json_answer(obj: dict) -> bytes:
    payload = json.dumps(obj).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload


class Answers:
    """The stub's answers, each made once: `created` is the stub's start time, so the same request
    always gets the same bytes."""

    def __init__(self, tokens: int, full_stream: bool = False) -> None:
        self.tokens, self.created, self.full_stream = tokens, int(time.time()), full_stream
        self.made: dict[tuple, object] = {}

    def count(self, request: dict) -> int:
        return min(int(request.get("max_tokens") or self.tokens), self.tokens)

    def stream(self, chat: bool, model, count: int, usage: bool = False) -> list[bytes]:
        """A streamed answer's writes, one per token: the last also carries the [DONE] event and the
        body's end (one write, so no two timers due at once have to run in order), and with `usage`
        (the request's stream_options.include_usage) a usage chunk before [DONE], as engines send."""
        key = ("stream", chat, model, count, usage)
        if key not in self.made:
            parts = []
            for i in range(count):
                word = WORDS[i % len(WORDS)]
                choice = {"index": 0, "delta": {"content": word}, "finish_reason": None} if chat else \
                    {"index": 0, "text": word, "finish_reason": None}
                parts.append(_chunk({"id": "stub-1", "object": "chat.completion.chunk" if chat else "text_completion",
                                     "created": self.created, "model": model, "choices": [choice]}))
            if self.full_stream:  # the role rides on the first token's write, the finish on the last's
                kind = "chat.completion.chunk" if chat else "text_completion"
                head = {"id": "stub-1", "object": kind, "created": self.created, "model": model}
                end = {"index": 0, "delta": {}, "finish_reason": "length"} if chat else \
                    {"index": 0, "text": "", "finish_reason": "length"}
                role = _chunk({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None}]}) if chat else b""
                parts = parts or [b""]
                parts[0] = role + parts[0]
                parts[-1] += _chunk({**head, "choices": [end]})
            if usage:
                parts = parts or [b""]
                parts[-1] += _chunk({"id": "stub-1", "object": "chat.completion.chunk" if chat else "text_completion",
                                     "created": self.created, "model": model, "choices": [],
                                     "usage": {"prompt_tokens": 5, "completion_tokens": count,
                                               "total_tokens": 5 + count}})
            self.made[key] = parts[:-1] + [(parts[-1] if parts else b"") + DONE]
        return self.made[key]

    def whole(self, chat: bool, model, count: int) -> bytes:
        key = ("whole", chat, model, count)
        if key not in self.made:
            text = "".join(WORDS[i % len(WORDS)] for i in range(count))
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"} \
                if chat else {"index": 0, "text": text, "finish_reason": "length"}
            self.made[key] = _json_answer({
                "id": "stub-1", "object": "chat.completion" if chat else "text_completion", "created": self.created,
                "model": model, "choices": [choice],
                "usage": {"prompt_tokens": 5, "completion_tokens": count, "total_tokens": 5 + count}})
        return self.made[key]


MODELS = _json_answer({"object": "list", "data": [{"id": "stub", "object": "model"}]})
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nnot JSON body"


class Slots:
    """At most `size` completions generated at once; the connections beyond wait in arrival order."""

    def __init__(self, size: int) -> None:
        self.size, self.busy = size, 0
        self.waiting: collections.deque[StubConnection] = collections.deque()

    def take(self, conn: "StubConnection") -> None:
        if self.busy < self.size:
            self.busy += 1
            conn.generate()
        else:
            self.waiting.append(conn)

    def give_back(self) -> None:
        """A slot is free: hand it to the first waiter still connected, else keep it free."""
        while self.waiting:
            conn = self.waiting.popleft()
            if not conn.lost:
                conn.generate()
                return
        self.busy -= 1


class StubConnection(asyncio.Protocol):
    """One client connection: requests one at a time (a request that comes while an answer is still
    going out waits for it), each answered on timers."""

    def __init__(self, answers: Answers, token_delay_s: float, slots: Slots | None = None) -> None:
        self.answers, self.token_delay_s, self.slots = answers, token_delay_s, slots
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.transport = None
        self.busy = False
        self.lost = False
        self.holding = False  # this connection's completion has one of the slots
        self.pending: tuple[str, dict] | None = None  # a completion waiting for a slot
        self.timers: list[asyncio.TimerHandle] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.lost = True
        for timer in self.timers:
            timer.cancel()
        self.timers = []
        if self.holding:
            self.holding = False
            self.slots.give_back()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        """Answer the next request, if the last one is over and the next is all here."""
        if self.busy or self.transport.is_closing():
            return
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self.transport.close()
            return
        lines = self.buffer[:head_end].decode("latin1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        body_end = head_end + 4 + length
        if len(self.buffer) < body_end:
            return
        body, self.buffer = self.buffer[head_end + 4:body_end], self.buffer[body_end:]
        self.busy = True
        self._respond(method, path, body)

    def _respond(self, method: str, path: str, body: bytes) -> None:
        if method == "GET":
            return self._finish(MODELS)
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return self._finish(BAD_REQUEST)
        self.pending = (path, request)
        if self.slots is None:
            return self.generate()
        self.slots.take(self)

    def generate(self) -> None:
        """Answer the pending completion on timers (it has a slot, or there are no slots)."""
        (path, request), self.pending = self.pending, None
        self.holding = self.slots is not None
        chat, model, count = path.endswith("/chat/completions"), request.get("model"), self.answers.count(request)
        if not request.get("stream"):
            answer = self.answers.whole(chat, model, count)
            self.timers = [self.loop.call_later(self.token_delay_s * count, self._finish, answer)]
            return
        self.transport.write(STREAM_HEAD)
        options = request.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        parts = self.answers.stream(chat, model, count, usage)
        started = self.loop.time()
        self.timers = [self.loop.call_at(started + (i + 1) * self.token_delay_s, self.transport.write, part)
                       for i, part in enumerate(parts[:-1])]
        self.timers.append(self.loop.call_at(started + count * self.token_delay_s, self._finish, parts[-1]))

    def _finish(self, data: bytes) -> None:
        self.transport.write(data)
        self.timers, self.busy = [], False
        if self.holding:
            self.holding = False
            self.slots.give_back()
        if self.buffer:
            self._next()


async def serve(port: int, tokens: int, token_delay_s: float, *, host: str = "127.0.0.1",
                slots: int | None = None, full_stream: bool = False) -> None:
    answers = Answers(tokens, full_stream)
    shared_slots = Slots(slots) if slots else None
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubConnection(answers, token_delay_s, shared_slots), host, port,
                                      backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--token-delay-ms", type=float, default=2.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--slots", type=int, default=None, help="completions generated at once (default: no cap)")
    parser.add_argument("--full-stream", action="store_true",
                        help="streams open with a role chunk and close with a finish_reason chunk")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.tokens, args.token_delay_ms / 1000, host=args.host, slots=args.slots,
                      full_stream=args.full_stream))

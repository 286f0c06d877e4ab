"""A fast, deterministic OpenAI-compatible engine for benchmarks that must measure Porten alone.

python bench/stub_engine.py --port 9100 --token-delay-ms 2 --tokens 16
Answers GET /v1/models, GET /health, POST /v1/chat/completions and /v1/completions (stream or not)
with the same tokens every time, spaced by a fixed delay, over HTTP/1.1 keep-alive.

A streamed answer's tokens are due on a clock that starts when the request is read (the n-th
token n delays after it), as a real engine's are: its generation runs on the accelerator or in its own thread,
apart from the writes, so a write that is late does not make the later tokens late. Sleeping the
delay after each write instead would add every scheduling delay a proxy on the same cores causes
to all the tokens after it: on 2 shared cores the first-to-last token span grew from 32.2 ms
straight to the stub to 33.4 ms through bench/byte_pipe.py, a relay doing no work (30.2 and
30.3 ms on the clock), which put the relay itself at the 1.05 ratio Porten is held to.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


def _chunk(obj: dict) -> bytes:
    data = b"data: " + json.dumps(obj).encode() + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Stub:
    def __init__(self, tokens: int, token_delay_s: float) -> None:
        self.tokens, self.token_delay_s = tokens, token_delay_s

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode().split(" ", 2)
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                await self.respond(writer, method, path, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def respond(self, writer, method: str, path: str, body: bytes) -> None:
        if method == "GET":
            payload = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            await writer.drain()
            return
        request = json.loads(body or b"{}")
        count = min(int(request.get("max_tokens") or self.tokens), self.tokens)
        chat = path.endswith("/chat/completions")
        created = int(time.time())
        if request.get("stream"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            loop = asyncio.get_running_loop()
            started = loop.time()
            for i in range(count):
                await asyncio.sleep(started + (i + 1) * self.token_delay_s - loop.time())
                word = WORDS[i % len(WORDS)]
                choice = {"index": 0, "delta": {"content": word}, "finish_reason": None} if chat else \
                    {"index": 0, "text": word, "finish_reason": None}
                writer.write(_chunk({"id": "stub-1", "object": "chat.completion.chunk" if chat else "text_completion",
                                     "created": created, "model": request.get("model"), "choices": [choice]}))
                await writer.drain()
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
            await writer.drain()
            return
        await asyncio.sleep(self.token_delay_s * count)
        text = "".join(WORDS[i % len(WORDS)] for i in range(count))
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"} if chat \
            else {"index": 0, "text": text, "finish_reason": "length"}
        payload = json.dumps({"id": "stub-1", "object": "chat.completion" if chat else "text_completion",
                              "created": created, "model": request.get("model"), "choices": [choice],
                              "usage": {"prompt_tokens": 5, "completion_tokens": count, "total_tokens": 5 + count}}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        await writer.drain()


async def serve(port: int, tokens: int, token_delay_s: float) -> None:
    server = await asyncio.start_server(Stub(tokens, token_delay_s).handle, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--token-delay-ms", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.tokens, args.token_delay_ms / 1000))

"""The floor for any proxy: a relay that copies bytes between each client connection and its own
engine connection and does nothing else (no HTTP parsing, no routing, no accounting).

    python bench/byte_pipe.py --upstream-port 8001 --port 8002

bench/gateway_overhead.py measures it next to Porten: what it adds is what one more process and
one more hop cost on the machine at hand, before any proxy does any work.
"""
from __future__ import annotations

import argparse
import asyncio


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65_536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(upstream_port: int, port: int) -> None:
    async def relay(client_reader, client_writer):
        try:
            engine_reader, engine_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pump(client_reader, engine_writer), _pump(engine_reader, client_writer))

    server = await asyncio.start_server(relay, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.upstream_port, args.port))

"""The hub's HTTP client for engines: aiohttp, one session (and keep-alive pool) per event loop."""
from __future__ import annotations

import asyncio

import aiohttp
from django.conf import settings

from porten.loops import made_for_this_loop, per_loop

JSON_HEADERS = {"Content-Type": "application/json"}
# Below the engines' own keep-alive (uvicorn's and llama-server's are 5 s), so the hub never sends
# on a connection the engine is closing at that moment.
KEEPALIVE_S = 4.0
CONNECT_TIMEOUT_S = 5.0


class EngineUnavailable(Exception):
    """The engine could not be reached, or broke off before its answer began."""


class EngineUnreachable(EngineUnavailable):
    """No connection to the engine's address could be made at all."""


def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
        timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S,
                                      sock_read=settings.PORTEN_UPSTREAM_TIMEOUT_S),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


def engine_session() -> aiohttp.ClientSession:
    return per_loop(_new_session)


async def close_engine_session() -> None:
    """Close this loop's connections to engines (the server is stopping)."""
    session = made_for_this_loop(_new_session)
    if session is not None:
        await session.close()


async def engine_post(url: str, payload: bytes) -> aiohttp.ClientResponse:
    """POST a JSON body; returns once the answer's head is in (read or close the response). A
    connection the engine closed just before is retried once on a fresh one."""
    for attempt in (1, 2):
        try:
            return await engine_session().post(url, data=payload, headers=JSON_HEADERS)
        except aiohttp.ServerDisconnectedError as exc:
            if attempt == 2:
                raise EngineUnavailable(str(exc) or "the engine closed the connection") from exc
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise EngineUnreachable(str(exc) or type(exc).__name__) from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EngineUnavailable(str(exc) or type(exc).__name__) from exc
    raise AssertionError("unreachable")


async def engine_read(response: aiohttp.ClientResponse) -> bytes:
    """The whole body of an answer (EngineUnavailable if the engine broke off)."""
    try:
        return await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise EngineUnavailable(str(exc) or type(exc).__name__) from exc
    finally:
        response.release()

"""Shared Redis clients: one sync pool per process, one async pool per event loop."""
from __future__ import annotations

import threading

import redis
import redis.asyncio as aioredis
from django.conf import settings

from .loops import forget_loop_objects, per_loop

_lock = threading.Lock()
_sync_client: redis.Redis | None = None

# Connections per event loop (redis-py's default size), and how long a call waits for one of them
# when all are busy: a burst of a thousand cold requests waits its turn instead of failing.
ASYNC_POOL_SIZE = 100
ASYNC_POOL_WAIT_S = 10.0


def redis_client() -> redis.Redis:
    global _sync_client
    with _lock:
        if _sync_client is None:
            _sync_client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True, health_check_interval=30)
        return _sync_client


def _new_async_client() -> aioredis.Redis:
    # Redis-py's default pool raises MaxConnectionsError at once on the 101st concurrent call;
    # this one waits for a connection.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.REDIS_URL, max_connections=ASYNC_POOL_SIZE, timeout=ASYNC_POOL_WAIT_S, decode_responses=True,
        health_check_interval=30)
    return aioredis.Redis.from_pool(pool)


def aredis_client() -> aioredis.Redis:
    """This event loop's client (an asyncio connection pool is bound to the loop that made it)."""
    return per_loop(_new_async_client)


def reset_clients() -> None:
    """Forget pooled clients (tests point REDIS_URL elsewhere between sessions)."""
    global _sync_client
    with _lock:
        _sync_client = None
    forget_loop_objects()

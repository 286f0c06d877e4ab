"""Shared Redis clients: one sync pool per process, one async pool per event loop."""
from __future__ import annotations

import asyncio
import threading
import weakref

import redis
import redis.asyncio as aioredis
from django.conf import settings

_lock = threading.Lock()
_sync_client: redis.Redis | None = None
_async_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis]" = weakref.WeakKeyDictionary()


def redis_client() -> redis.Redis:
    global _sync_client
    with _lock:
        if _sync_client is None:
            _sync_client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True, health_check_interval=30)
        return _sync_client


def aredis_client() -> aioredis.Redis:
    # An asyncio connection pool is bound to the loop that created it.
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = aioredis.Redis.from_url(settings.REDIS_URL, decode_responses=True, health_check_interval=30)
        _async_clients[loop] = client
    return client


def reset_clients() -> None:
    """Forget pooled clients (tests point REDIS_URL elsewhere between sessions)."""
    global _sync_client
    with _lock:
        _sync_client = None
        _async_clients.clear()

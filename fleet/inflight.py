"""Requests in flight per instance, so a draining instance can finish them before it unloads."""
from __future__ import annotations

from porten.redis import aredis_client, redis_client

TTL_S = 3600  # a crashed hub's counts do not pin an instance forever


def _key(instance_id: int) -> str:
    return f"porten:inflight:{instance_id}"


async def inflight_enter(instance_id: int) -> None:
    pipe = aredis_client().pipeline(transaction=False)
    pipe.incr(_key(instance_id))
    pipe.expire(_key(instance_id), TTL_S)
    await pipe.execute()


async def inflight_leave(instance_id: int) -> None:
    await aredis_client().decr(_key(instance_id))


def inflight_count(instance_id: int) -> int:
    return max(0, int(redis_client().get(_key(instance_id)) or 0))

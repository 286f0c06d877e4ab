"""The hub's shared Redis clients against real Redis."""
from __future__ import annotations

import asyncio

from porten.redis import aredis_client


async def test_a_burst_past_the_pool_size_waits_for_connections_instead_of_failing():
    client = aredis_client()
    await client.set("porten:test:burst", "x")
    burst = client.connection_pool.max_connections * 3
    # A non-blocking pool raised MaxConnectionsError on the 101st concurrent call: a health check
    # answered 503 and a warming poll fell back to stale figures during a burst of cold requests.
    values = await asyncio.gather(*[client.get("porten:test:burst") for _ in range(burst)])
    assert values == ["x"] * burst

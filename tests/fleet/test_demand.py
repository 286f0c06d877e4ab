"""Unmet demand against real Redis: a burst of cold requests is counted in full, each count is in
Redis before its request goes on to the planner, and the burst shares its round trips."""
from __future__ import annotations

import asyncio

from fleet.demand import demand_counts, demand_record
from porten.redis import redis_client


def _connections_received() -> int:
    return int(redis_client().info("stats")["total_connections_received"])


async def test_a_burst_of_cold_requests_counts_every_one_with_few_connections():
    model_id, burst = "demand-burst-model", 500
    before = demand_counts([model_id])[model_id]
    opened_before = _connections_received()
    # Redis-py's asyncio pool holds at most 100 connections and refused the 101st at once: one
    # pipeline per request lost about an eighth of a burst of 1,000 cold requests.
    await asyncio.gather(*[demand_record(model_id, served=False) for _ in range(burst)])
    assert demand_counts([model_id])[model_id] == before + burst
    assert _connections_received() - opened_before <= 5


async def test_each_count_is_in_redis_when_its_call_returns():
    model_id = "demand-each-model"
    before = demand_counts([model_id])[model_id]

    async def record_then_read() -> float:
        await demand_record(model_id, served=False)
        return demand_counts([model_id])[model_id]  # what the planner reads next

    seen = await asyncio.gather(*[record_then_read() for _ in range(50)])
    # Every caller sees at least its own count (and all of those before it in its batch).
    assert min(seen) >= before + 1
    assert sorted(seen)[-1] == before + 50


async def test_a_caller_that_gives_up_still_counts():
    model_id = "demand-cancelled-model"
    before = demand_counts([model_id])[model_id]
    tasks = [asyncio.create_task(demand_record(model_id, served=False)) for _ in range(20)]
    await asyncio.sleep(0)
    for task in tasks[:10]:
        task.cancel()  # a client that disconnected: its request still happened
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(50):
        if demand_counts([model_id])[model_id] == before + 20:
            break
        await asyncio.sleep(0.02)
    assert demand_counts([model_id])[model_id] == before + 20

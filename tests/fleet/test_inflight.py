"""The per-process request tally against real Redis: in-flight counts every hub process can see
(draining waits on them) and served demand, written in batches off the request path."""
from __future__ import annotations

import asyncio
import time

from fleet.demand import demand_counts, last_requests
from fleet.gateway.inflight import PROCESS_ID, Tally
from fleet.live import inflight_count, inflight_key
from porten.redis import redis_client


async def eventually(check, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_in_flight_requests_reach_redis_and_leave_it():
    tally, instance_id = Tally(), 900_001
    tally.enter(instance_id, None)
    tally.enter(instance_id, None)
    await eventually(lambda: inflight_count(instance_id) == 2)
    tally.leave(instance_id)
    tally.leave(instance_id)
    await eventually(lambda: not redis_client().exists(inflight_key(instance_id)))
    assert inflight_count(instance_id) == 0


async def test_a_count_back_where_redis_has_it_is_not_written_again():
    tally, instance_id = Tally(), 900_002
    tally.enter(instance_id, None)
    # Written, and the tally's flush has heard back: Redis can have the count a moment before
    # the flush records it (seen under load), and a flush then would rightly write it again.
    await eventually(lambda: inflight_count(instance_id) == 1 and tally.written.get(instance_id) == 1)
    redis_client().hset(inflight_key(instance_id), PROCESS_ID, 7)  # a marker: any write would replace it
    tally.leave(instance_id)
    tally.enter(instance_id, None)  # the next request came in before the next flush
    await tally.flush()
    assert redis_client().hget(inflight_key(instance_id), PROCESS_ID) == "7"
    tally.leave(instance_id)
    await tally.flush()
    assert not redis_client().exists(inflight_key(instance_id))


async def test_served_requests_become_demand_within_about_a_second():
    tally, instance_id, model_id = Tally(), 900_003, "tally-served-model"
    before = demand_counts([model_id])[model_id]
    started = time.time()
    for _ in range(3):
        tally.enter(instance_id, model_id)
        tally.leave(instance_id)
    await eventually(lambda: demand_counts([model_id])[model_id] == before + 3, timeout_s=3.0)
    assert last_requests([model_id])[model_id] >= started
    assert not tally.served  # nothing left owed


async def test_served_counts_owed_to_redis_do_not_wake_an_idle_hub_every_tick():
    from fleet.gateway.inflight import FLUSH_S, SLOW_FLUSH_S

    tally, instance_id, model_id = Tally(), 900_005, "tally-idle-model"
    flushes = []
    flush = tally.flush

    async def counted():
        flushes.append(time.monotonic())
        await flush()

    tally.flush = counted
    tally.slow_flushed_at = time.monotonic()  # served counts were just written: the next are due in a second
    before = demand_counts([model_id])[model_id]
    tally.enter(instance_id, model_id)
    tally.leave(instance_id)
    await eventually(lambda: demand_counts([model_id])[model_id] == before + 1, timeout_s=SLOW_FLUSH_S + 2)
    # One flush for the in-flight change, one when the served count is due: not one per tick.
    assert len(flushes) <= 3 < SLOW_FLUSH_S / FLUSH_S, flushes
    assert flushes[-1] - flushes[0] >= SLOW_FLUSH_S - 2 * FLUSH_S


async def test_a_count_that_only_grows_or_shrinks_is_written_once_a_second():
    from fleet.gateway.inflight import FLUSH_S, SLOW_FLUSH_S

    tally, instance_id = Tally(), 900_006
    try:
        tally.enter(instance_id, None)  # from zero: written within a tick or so
        await eventually(lambda: inflight_count(instance_id) == 1, timeout_s=FLUSH_S * 10)
        started = tally.slow_flushed_at = time.monotonic()  # as if the last slow flush was just now
        for _ in range(4):  # a steady load: more requests come, some leave, never down to zero
            tally.enter(instance_id, None)
            tally.enter(instance_id, None)
            tally.leave(instance_id)
            await asyncio.sleep(FLUSH_S * 2)
        assert inflight_count(instance_id) == 1  # 5 in flight, Redis not written at every tick
        await eventually(lambda: inflight_count(instance_id) == 5, timeout_s=SLOW_FLUSH_S + 1)
        assert time.monotonic() - started >= SLOW_FLUSH_S - 2 * FLUSH_S
        for _ in range(5):
            tally.leave(instance_id)
        await eventually(lambda: not redis_client().exists(inflight_key(instance_id)), timeout_s=FLUSH_S * 10)
    finally:
        redis_client().delete(inflight_key(instance_id))


async def test_requests_that_come_and_go_within_a_tick_cost_no_write():
    from fleet.gateway.inflight import FLUSH_S

    tally, instance_id = Tally(), 900_004
    redis_client().hset(inflight_key(instance_id), PROCESS_ID, 7)  # a marker: any write would replace or remove it
    try:
        for _ in range(5):  # one client's short requests, back to back
            tally.enter(instance_id, None)
            await asyncio.sleep(FLUSH_S / 20)
            tally.leave(instance_id)
        await asyncio.sleep(FLUSH_S * 4)
        assert redis_client().hget(inflight_key(instance_id), PROCESS_ID) == "7"
        tally.enter(instance_id, None)  # one that stays is written within a tick or so
        await eventually(lambda: inflight_count(instance_id) == 1, timeout_s=FLUSH_S * 10)
    finally:
        tally.leave(instance_id)
        await tally.flush()
        redis_client().delete(inflight_key(instance_id))

"""Requests in flight per instance (so a draining instance can finish them before it unloads), and
served demand, tallied in this process and written to Redis in batches: the hot path itself makes
no Redis round trip."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import Counter

from fleet.demand import demand_commands
from fleet.live import inflight_key
from porten.loops import per_loop
from porten.redis import aredis_client

logger = logging.getLogger(__name__)

TTL_S = 3600  # a crashed hub's counts do not pin an instance forever
# An instance's count reaching or leaving zero is in Redis within FLUSH_S: draining waits for
# zero, and a request that has just started must hold it off.
FLUSH_S = 0.05
# Served counts feed demand (minute buckets) and the idle clock (a 10-minute window), and a count
# that only grows or shrinks (32 in flight, then 31) changes nothing a reader decides: a second
# late is fine, and one write a second leaves the hub's loop to the requests.
SLOW_FLUSH_S = 1.0
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Tally:
    """This process's in-flight counts and served-request counts, flushed by one task per loop."""

    def __init__(self) -> None:
        self.inflight: Counter[int] = Counter()
        self.dirty: set[int] = set()
        self.written: dict[int, int] = {}  # what Redis holds for this process
        self.resized: set[int] = set()  # counts that changed but not to or from zero, owed to Redis
        self.served: Counter[str] = Counter()
        self.slow_flushed_at = 0.0  # when served counts and resized counts were last written
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.slow_timer: asyncio.TimerHandle | None = None

    def enter(self, instance_id: int, served_model_id: str | None) -> None:
        self.inflight[instance_id] += 1
        self.dirty.add(instance_id)
        if served_model_id is not None:
            self.served[served_model_id] += 1
        self._kick()

    def leave(self, instance_id: int) -> None:
        self.inflight[instance_id] -= 1
        self.dirty.add(instance_id)
        self._kick()

    def _kick(self) -> None:
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._flush_forever(), name="porten-tally")

    async def _flush_forever(self) -> None:
        while True:
            await self.wake.wait()
            # Gather a tick's changes before writing: at a steady load the count at each tick is
            # where Redis has it, so requests that come and go within a tick (one client sending
            # short requests back to back, say) cost no write at all.
            await asyncio.sleep(FLUSH_S)
            self.wake.clear()
            try:
                await self.flush()
            except Exception:
                logger.warning("could not write request tallies to Redis", exc_info=True)
            if (self.served or self.resized) and self.slow_timer is None:
                # Still owed to Redis: come back when they are due (a count that changes brings
                # the loop back sooner), not every tick until then.
                due_in = SLOW_FLUSH_S - (time.monotonic() - self.slow_flushed_at) - FLUSH_S
                self.slow_timer = asyncio.get_running_loop().call_later(max(0.0, due_in), self._slow_due)

    def _slow_due(self) -> None:
        self.slow_timer = None
        self.wake.set()

    async def flush(self) -> None:
        due = bool(self.served or self.resized) and time.monotonic() - self.slow_flushed_at >= SLOW_FLUSH_S
        if not self.dirty and not due:
            return
        dirty, self.dirty = self.dirty, set()
        served = Counter()
        if due:
            served, self.served = self.served, Counter()
            dirty |= self.resized
            self.resized = set()
            self.slow_flushed_at = time.monotonic()
        pipe = aredis_client().pipeline(transaction=False)
        writing: dict[int, int] = {}
        for instance_id in dirty:
            count = max(self.inflight[instance_id], 0)
            if count == 0:
                del self.inflight[instance_id]
            written = self.written.get(instance_id, 0)
            if count == written:
                continue  # back where it was: one request left and the next came in between
            if not due and count and written:
                self.resized.add(instance_id)  # still in flight, only more or fewer: with the next slow flush
                continue
            writing[instance_id] = count
            if count > 0:
                pipe.hset(inflight_key(instance_id), PROCESS_ID, count)
                pipe.expire(inflight_key(instance_id), TTL_S)
            else:
                pipe.hdel(inflight_key(instance_id), PROCESS_ID)
        if not writing and not served:
            return
        now = time.time()
        for model_id, count in served.items():
            demand_commands(pipe, model_id, served=True, now=now, count=count)
        try:
            await pipe.execute()
        except BaseException:
            self.dirty |= writing.keys()  # written or not, say it again next time
            raise
        for instance_id, count in writing.items():
            if count:
                self.written[instance_id] = count
            else:
                self.written.pop(instance_id, None)


def tally() -> Tally:
    """This event loop's tally."""
    return per_loop(Tally)

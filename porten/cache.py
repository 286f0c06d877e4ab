"""Short-lived per-process caches of database answers on the request path, with one lookup at a
time per key (single flight) and a background refresh of answers just past their time."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from .loops import per_loop

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_ENTRIES = 10_000
_caches: list[Cache] = []


class Cache(Generic[K, V]):
    """`await cache.get(key)`: the answer of `lookup(key)` (None meaning "there is none"), reused
    for `ttl_s`. A positive answer up to `stale_for_s` past its time is answered at once while one
    task looks it up again; a negative or older one is looked up before it is answered. Callers
    that find the same key out of date together share one lookup, which runs in a task of its own
    (a caller whose client leaves does not cancel it for the others). Without `keep_negative`, a
    None answer is not kept: the next call looks the key up again."""

    def __init__(self, name: str, lookup: Callable[[K], Awaitable[V | None]], *, ttl_s: float,
                 stale_for_s: float = 2.0, keep_negative: bool = True) -> None:
        self.name, self.lookup, self.ttl_s, self.stale_for_s = name, lookup, ttl_s, stale_for_s
        self.keep_negative = keep_negative
        self.entries: dict[K, tuple[float, V | None]] = {}  # key -> (when it was looked up, answer)
        _caches.append(self)

    async def get(self, key: K, *, max_age_s: float | None = None) -> V | None:
        hit = self.entries.get(key)
        if hit is not None:
            past_due_s = time.monotonic() - hit[0] - (self.ttl_s if max_age_s is None else max_age_s)
            if past_due_s < 0:
                return hit[1]
            if hit[1] is not None and past_due_s < self.stale_for_s:
                self._running(key)
                return hit[1]
        return await self.fetch(key)

    async def fetch(self, key: K) -> V | None:
        """Look the key up now (or join the lookup already running for it)."""
        return await asyncio.shield(self._running(key))

    def put(self, key: K, value: V | None) -> None:
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (time.monotonic(), value)

    def forget(self, key: K) -> None:
        self.entries.pop(key, None)

    def _running(self, key: K) -> asyncio.Task:
        running = per_loop(_running_calls)
        task = running.get((self.name, key))
        if task is None or task.done():
            task = running[(self.name, key)] = asyncio.get_running_loop().create_task(self._look_up(key))
            task.add_done_callback(functools.partial(_finished, running, (self.name, key)))
        return task

    async def _look_up(self, key: K) -> V | None:
        asked_at = time.monotonic()
        value = await self.lookup(key)
        if value is None and not self.keep_negative:
            self.entries.pop(key, None)
            return None
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (asked_at, value)
        return value


def _running_calls() -> dict[tuple[str, Hashable], asyncio.Task]:
    return {}


def _finished(running: dict, key: tuple, task: asyncio.Task) -> None:
    if running.get(key) is task:
        del running[key]
    if not task.cancelled() and task.exception() is not None:
        # By name only: a key may be a secret (an API key as sent).
        logger.warning("a %s lookup failed", key[0], exc_info=task.exception())


async def once(name: str, key: Hashable, work: Callable[[], Awaitable[V]]) -> V:
    """`await work()`, or the outcome of the call already running under (name, key) on this loop:
    callers that come together share one call, and one leaving does not cancel it for the rest."""
    running = per_loop(_running_calls)
    task = running.get((name, key))
    if task is None or task.done():
        task = running[(name, key)] = asyncio.get_running_loop().create_task(work())
        task.add_done_callback(functools.partial(_finished, running, (name, key)))
    return await asyncio.shield(task)


def clear_caches() -> None:
    """Forget every cached answer in this process (tests recreate rows under the same keys)."""
    for cache in _caches:
        cache.entries.clear()

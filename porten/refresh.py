"""Per-process caches on the request path, refreshed in the background.

The gateway keeps a few answers from the database per process (an offered model, a model's ready
engine) for a second or two. When one ran out, the request that found it waited for the query, in
one of asgiref's threads: at one client, about one request in thirty waited 2-3 ms, which was most
of Porten's p99. Now a request that finds an answer just past its time gets it at once, and one
task per entry looks again meanwhile (`usable`, `refresh_soon`). An answer more than STALE_FOR_S past its
time, or a negative one (no such model, no ready engine), is looked up before it is used, as before;
callers that find the same entry out of date at the same moment wait for one lookup (`look_up_once`)."""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

logger = logging.getLogger(__name__)

# How long past its time an answer may still be used while it is looked up again. Short, so that
# a process that had no request for a while asks the database first (a model unloaded meanwhile
# must not be routed to): steady traffic comes back well within it.
STALE_FOR_S = 2.0

T = TypeVar("T")

_running: dict[Hashable, asyncio.Task] = {}


def usable(key: Hashable, value: object, past_due_s: float, refresh: Callable[..., Awaitable[object]],
           *args: object) -> bool:
    """Whether a cached `value`, `past_due_s` seconds past its time (negative: not due yet), may be
    answered now. A positive answer less than STALE_FOR_S past its time may, and `refresh(*args)` is
    started for it (refresh_soon); a negative one (None) or an older one may not."""
    if past_due_s < 0:
        return True
    if value is not None and past_due_s < STALE_FOR_S:
        refresh_soon(key, refresh, *args)
        return True
    return False


def refresh_soon(key: Hashable, refresh: Callable[..., Awaitable[object]], *args: object) -> None:
    """Run `refresh(*args)` in a task of its own, unless one for `key` is already running on this loop.
    A failure is logged: the entry stays as it was, and the next caller who finds it stale tries
    again."""
    _task_for(key, refresh, *args)


async def look_up_once(key: Hashable, lookup: Callable[..., Awaitable[T]], *args: object) -> T:
    """`await lookup(*args)`, or the outcome of the one already running for `key` on this loop (a
    caller's, or refresh_soon's). After a quiet spell, every call of a burst found the key and the
    model past their time and queried the database for them itself, all in the one thread Django's
    async ORM uses, one after the other: 32 calls at once after 13 s idle took 130-180 ms on
    average, and 86-95 ms with one lookup (most of the rest is the machine waking up: one call
    straight to the stub engine after such a gap took 53-73 ms). The lookup runs in a task of its
    own: a caller that goes away (its client left) does not cancel it for the others."""
    return await asyncio.shield(_task_for(key, lookup, *args))


def _task_for(key: Hashable, work: Callable[..., Awaitable[T]], *args: object) -> asyncio.Task:
    loop = asyncio.get_running_loop()
    task = _running.get(key)
    if task is None or task.done() or task.get_loop() is not loop:
        task = _running[key] = loop.create_task(work(*args))
        task.add_done_callback(functools.partial(_finished, key))
    return task


def _finished(key: Hashable, task: asyncio.Task) -> None:
    if _running.get(key) is task:
        del _running[key]
    if not task.cancelled() and task.exception() is not None:
        logger.warning("looking up %s failed", key, exc_info=task.exception())

"""Per-process caches on the request path, refreshed in the background.

The gateway keeps a few answers from the database per process (an offered model, a model's ready
engine) for a second or two. When one ran out, the request that found it waited for the query, in
one of asgiref's threads: at one client, about one request in thirty waited 2-3 ms, which was most
of Porten's p99. Now a request that finds an answer just past its time gets it at once, and one
task per entry looks again meanwhile (`usable`, `refresh_soon`). An answer more than STALE_FOR_S past its
time, or a negative one (no such model, no ready engine), is looked up before it is used, as before."""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Hashable

logger = logging.getLogger(__name__)

# How long past its time an answer may still be used while it is looked up again. Short, so that
# a process that had no request for a while asks the database first (a model unloaded meanwhile
# must not be routed to): steady traffic comes back well within it.
STALE_FOR_S = 2.0

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
    loop = asyncio.get_running_loop()
    task = _running.get(key)
    if task is not None and not task.done() and task.get_loop() is loop:
        return
    task = _running[key] = loop.create_task(refresh(*args))
    task.add_done_callback(functools.partial(_finished, key))


def _finished(key: Hashable, task: asyncio.Task) -> None:
    if _running.get(key) is task:
        del _running[key]
    if not task.cancelled() and task.exception() is not None:
        logger.warning("refreshing %s failed", key, exc_info=task.exception())

"""Waiting for a model's state without a thread per waiter: one Redis pattern subscription per
event loop fans out to every coroutine waiting on that model."""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from fleet.live import WarmingState, events_channel
from porten.loops import per_loop
from porten.redis import aredis_client

logger = logging.getLogger(__name__)

_PATTERN = events_channel("*")


class ModelEvents:
    """Per event loop: a listener task and, per model, the futures of coroutines waiting on it."""

    def __init__(self) -> None:
        self.waiters: dict[str, set[asyncio.Future]] = defaultdict(set)
        self.latest: dict[str, WarmingState] = {}   # the newest published state per model (progress included)
        self.task: asyncio.Task | None = None
        self.subscribed = asyncio.Event()

    def ensure_listening(self) -> None:
        if self.task is None or self.task.done():
            self.subscribed.clear()
            self.task = asyncio.get_running_loop().create_task(self._listen(), name="porten-model-events")

    async def _listen(self) -> None:
        while True:
            pubsub = aredis_client().pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(_PATTERN)
                self.subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    model_id = message["channel"].split(":", 2)[-1]
                    self._wake(model_id, message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("model event listener lost Redis; reconnecting", exc_info=True)
                self.subscribed.clear()
                # Wake everyone so they re-read the truth while we reconnect.
                for model_id in list(self.waiters):
                    self._wake(model_id, None)
                await asyncio.sleep(0.5)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    def _wake(self, model_id: str, data: str | None) -> None:
        state = WarmingState.from_json(data)
        if state is not None:
            previous = self.latest.get(model_id)
            self.latest[model_id] = state
            if previous is not None and (previous.phase, previous.instance) == (state.phase, state.instance):
                # Progress within a phase only refreshes `latest`: a thousand waiters are not
                # woken a few times a second to re-read the same answer.
                return
        for future in self.waiters.pop(model_id, set()):
            if not future.done():
                future.set_result(state)

    async def watch(self, model_id: str) -> asyncio.Future:
        """Register interest before reading the truth, so a change in between is not missed."""
        self.ensure_listening()
        if not self.subscribed.is_set():
            try:
                await asyncio.wait_for(self.subscribed.wait(), timeout=2.0)
            except asyncio.TimeoutError:
                pass  # Redis trouble: the caller's timeout makes it re-read the truth
        future = asyncio.get_running_loop().create_future()
        self.waiters[model_id].add(future)
        return future

    async def wait(self, model_id: str, future: asyncio.Future, timeout_s: float) -> WarmingState | None:
        """The state that resolved `future`, or None after `timeout_s` (the caller then re-reads)."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            return None
        finally:
            self.discard(model_id, future)

    def discard(self, model_id: str, future: asyncio.Future) -> None:
        if not future.done():
            future.cancel()
        waiters = self.waiters.get(model_id)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                self.waiters.pop(model_id, None)


def model_events() -> ModelEvents:
    """This event loop's listener and waiters."""
    return per_loop(ModelEvents)

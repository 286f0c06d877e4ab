"""Tokens used per key (or signed-in person), model and hour, from the engine's `usage`: tallied in
this process and added, in batches off the request path, to the Prometheus token counter and to a
Redis hash; `porten.usage` moves the hash into the database."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from porten.loops import per_loop
from porten.metrics import tokens_count
from porten.redis import aredis_client
from porten.scopes import Scope
from porten.usage import PENDING_KEY, usage_field

logger = logging.getLogger(__name__)

FLUSH_S = 1.0


class UsageTally:
    """Tallies since the last flush (`counts`), and those counted in the Prometheus counter but not
    yet in Redis (`unsent`, kept while Redis is away)."""

    def __init__(self) -> None:
        # (hour, key id, user id, model id) -> [requests, prompt tokens, completion tokens]; named as
        # the Redis hash's fields (usage_field) only when flushed
        self.counts: dict[tuple, list[int]] = {}
        self.unsent: dict[tuple, list[int]] = {}
        self.task: asyncio.Task | None = None

    def add(self, scope: Scope | None, model_id: str, *, prompt_tokens: int, completion_tokens: int) -> None:
        key = (int(time.time() // 3600 * 3600), scope.api_key_id if scope is not None else None,
               scope.user_id if scope is not None else None, model_id)
        if (counts := self.counts.get(key)) is None:
            counts = self.counts[key] = [0, 0, 0]
        counts[0] += 1
        counts[1] += prompt_tokens
        counts[2] += completion_tokens
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._flush_soon(), name="porten-usage")

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_S)
        await self.flush()

    async def flush(self) -> None:
        """Add the new tallies to the token counter, then everything not yet sent to Redis."""
        fresh, self.counts = self.counts, {}
        for key, counts in fresh.items():
            tokens_count(key[3], counts[1], counts[2])
            _add_to(self.unsent, key, counts)
        unsent, self.unsent = self.unsent, {}
        fields = Counter({usage_field(*key, kind): amount for key, counts in unsent.items()
                          for kind, amount in zip("rpc", counts) if amount})
        if not fields:
            return
        pipe = aredis_client().pipeline(transaction=False)
        for name, amount in fields.items():
            pipe.hincrby(PENDING_KEY, name, amount)
        try:
            await pipe.execute()
        except Exception:
            for key, counts in unsent.items():  # kept for the next flush; a hub that dies meanwhile loses them
                _add_to(self.unsent, key, counts)
            logger.warning("could not write usage to Redis; kept for the next try", exc_info=True)
            if self.task is None or self.task.done() or self.task is asyncio.current_task():
                self.task = asyncio.get_running_loop().create_task(self._flush_soon(), name="porten-usage")


def _add_to(tallies: dict[tuple, list[int]], key: tuple, counts: list[int]) -> None:
    kept = tallies.setdefault(key, [0, 0, 0])
    for i, amount in enumerate(counts):
        kept[i] += amount


def usage_tally() -> UsageTally:
    return per_loop(UsageTally)

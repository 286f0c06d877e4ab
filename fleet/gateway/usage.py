"""Tokens used per key (or signed-in person), model and hour, from the engine's `usage`: tallied in
this process and added to a Redis hash in batches, off the request path; `porten.usage` moves the
hash into the database."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from porten.loops import per_loop
from porten.redis import aredis_client
from porten.scopes import Scope
from porten.usage import PENDING_KEY, usage_field

logger = logging.getLogger(__name__)

FLUSH_S = 1.0


class UsageTally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.task: asyncio.Task | None = None

    def add(self, scope: Scope | None, model_id: str, *, prompt_tokens: int, completion_tokens: int) -> None:
        hour = int(time.time() // 3600 * 3600)
        key_id = scope.api_key_id if scope is not None else None
        user_id = scope.user_id if scope is not None else None
        self.counts[usage_field(hour, key_id, user_id, model_id, "r")] += 1
        if prompt_tokens:
            self.counts[usage_field(hour, key_id, user_id, model_id, "p")] += prompt_tokens
        if completion_tokens:
            self.counts[usage_field(hour, key_id, user_id, model_id, "c")] += completion_tokens
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._flush_soon(), name="porten-usage")

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_S)
        await self.flush()

    async def flush(self) -> None:
        counts, self.counts = self.counts, Counter()
        if not counts:
            return
        pipe = aredis_client().pipeline(transaction=False)
        for name, amount in counts.items():
            pipe.hincrby(PENDING_KEY, name, amount)
        try:
            await pipe.execute()
        except Exception:
            self.counts.update(counts)  # kept for the next flush; a hub that dies meanwhile loses them
            logger.warning("could not write usage to Redis; kept for the next try", exc_info=True)
            if self.task is None or self.task.done() or self.task is asyncio.current_task():
                self.task = asyncio.get_running_loop().create_task(self._flush_soon(), name="porten-usage")


def usage_tally() -> UsageTally:
    return per_loop(UsageTally)

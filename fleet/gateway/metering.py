"""What one /v1 request used: the engine's `usage` (or, for an engine that reports none in a stream,
the tokens counted as they pass), recorded per key and model and settled against the caller's token
limit. Streams ask the engine for a usage chunk; the client sees it only if it asked for one."""
from __future__ import annotations

import json
import logging
import re
from typing import AsyncIterator

from porten.metrics import tokens_count
from porten.scopes import Scope

from .limits import Taken, limits_settle
from .usage import usage_tally

logger = logging.getLogger(__name__)

# A chunk that carries a token of text (a non-empty content or text string).
_TOKEN = re.compile(rb'"(?:content|text)": ?"(?!")')
_USAGE = re.compile(rb'"usage": ?\{')


class Meter:
    def __init__(self, scope: Scope | None, model_id: str, taken: Taken | None, *, estimated_prompt_tokens: int,
                 client_wants_usage: bool = False) -> None:
        self.scope, self.model_id, self.taken = scope, model_id, taken
        self.estimated_prompt_tokens, self.client_wants_usage = estimated_prompt_tokens, client_wants_usage
        self.done = False

    def finish(self, *, prompt_tokens: int | None, completion_tokens: int) -> None:
        """Record once: tokens per key and model, and the caller's token limit settled on them."""
        if self.done:
            return
        self.done = True
        prompt = self.estimated_prompt_tokens if prompt_tokens is None else prompt_tokens
        try:
            usage_tally().add(self.scope, self.model_id, prompt_tokens=prompt, completion_tokens=completion_tokens)
            tokens_count(self.model_id, prompt, completion_tokens)
        except Exception:
            logger.warning("could not tally usage for %s", self.model_id, exc_info=True)
        if self.taken is not None:
            limits_settle(self.taken, used_tokens=prompt + completion_tokens)

    def finish_answer(self, status: int, content: bytes) -> None:
        """A whole answer: its `usage`, or nothing used when it failed."""
        usage = None
        if status == 200:
            try:
                usage = json.loads(content).get("usage")
            except (ValueError, AttributeError):
                usage = None
        if isinstance(usage, dict):
            self.finish(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                        completion_tokens=int(usage.get("completion_tokens") or 0))
        else:
            self.finish(prompt_tokens=None if status == 200 else 0, completion_tokens=0)


class MeteredStream:
    """An answer's event stream passed on event by event, watched for its usage chunk (dropped when
    the client did not ask for it) and for tokens (counted, for engines that send no usage). When the
    client asked for usage and the engine sent none, one is added before `[DONE]`."""

    def __init__(self, source: AsyncIterator[bytes], meter: Meter) -> None:
        self.source, self.meter = source, meter
        self.tokens, self.usage, self.last_chunk = 0, None, None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pending = b""
        async for part in self.source:
            if not pending and part.endswith(b"\n\n"):
                ready = part  # whole events, as engines write them: no copy
            else:
                pending += part
                end = pending.rfind(b"\n\n")
                if end < 0:
                    continue
                ready, pending = pending[:end + 2], pending[end + 2:]
            out = self._watch(ready)
            if out:
                yield out
        if pending:
            yield pending
        self._finish()

    def _watch(self, events: bytes) -> bytes:
        if b'"usage"' not in events and b"[DONE]" not in events:
            self.tokens += len(_TOKEN.findall(events))
            if self.meter.client_wants_usage and (start := events.rfind(b"data: {")) >= 0:
                self.last_chunk = events[start:].rstrip()  # whose id and model a made usage chunk takes
            return events
        kept = []
        for event in events.split(b"\n\n"):
            if not event:
                continue
            if event.startswith(b"data: [DONE]") and self.meter.client_wants_usage and self.usage is None:
                kept.append(self._made_usage_event())
            elif _USAGE.search(event):
                try:
                    chunk = json.loads(event[event.index(b"{"):])
                except ValueError:
                    chunk = None
                if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                    self.usage = chunk["usage"]
                    if not chunk.get("choices") and not self.meter.client_wants_usage:
                        continue  # the chunk Porten asked for, not the client
            else:
                self.tokens += len(_TOKEN.findall(event))
                if event.startswith(b"data: {"):
                    self.last_chunk = event
            kept.append(event)
        return b"".join(event + b"\n\n" for event in kept)

    def _made_usage_event(self) -> bytes:
        prompt = self.meter.estimated_prompt_tokens
        self.usage = {"prompt_tokens": prompt, "completion_tokens": self.tokens, "total_tokens": prompt + self.tokens}
        try:
            last = json.loads(self.last_chunk[self.last_chunk.index(b"{"):]) if self.last_chunk else {}
        except ValueError:
            last = {}
        chunk = {key: last[key] for key in ("id", "object", "created", "model") if key in last}
        chunk.update({"choices": [], "usage": self.usage})
        return b"data: " + json.dumps(chunk).encode()

    def _finish(self) -> None:
        if self.usage is not None:
            self.meter.finish(prompt_tokens=int(self.usage.get("prompt_tokens") or 0),
                                    completion_tokens=int(self.usage.get("completion_tokens") or 0))
        else:
            self.meter.finish(prompt_tokens=None, completion_tokens=self.tokens)

    async def aclose(self) -> None:
        try:
            await self.source.aclose()
        finally:
            self._finish()  # cut off by the client: what the engine produced until then

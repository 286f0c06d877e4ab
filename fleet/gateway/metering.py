"""What one /v1 request used: the engine's `usage` (or, for an engine that reports none in a stream,
the tokens counted as they pass), recorded per key and model and settled against the caller's token
limit. Streams ask the engine for a usage chunk; the client sees it only if it asked for one."""
from __future__ import annotations

import json
import logging
import re
from typing import AsyncIterator

from porten.scopes import Scope

from .limits import Taken, limits_settle
from .usage import usage_tally

logger = logging.getLogger(__name__)

# A chunk that carries a token of text (a non-empty content or text string).
_TOKEN = re.compile(rb'"(?:content|text)": ?"[^"]')
_USAGE = re.compile(rb'"usage": ?\{')
_NO_CHOICES = re.compile(rb'"choices": ?\[\]')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens": ?(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens": ?(\d+)')


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


COUNT_EVERY_PARTS = 64  # parts passed on are counted for tokens in batches of this many


class StreamMeter:
    """Watches an answer's event stream as it is sent, part by part (`feed`, then `end`; `close`
    however the stream ends): drops the usage chunk the client did not ask for, adds one before
    `[DONE]` when the client asked and the engine sent none, and records the usage. Tokens are
    counted only where the engine's usage is missing (an engine that sends none, a stream cut off):
    the parts passed on are kept (COUNT_EVERY_PARTS at most) and counted in one scan.

    The common part needs nothing but keeping: when the client did not ask for usage, nothing is
    pending and the part is whole events with no `"usage"` in them, a sender may append it to
    `passed` itself (calling `count` once COUNT_EVERY_PARTS are kept) and send it as it is, instead
    of calling `feed`. The two senders (asgi.send_response, `metered`) do so inline: every part of
    every stream goes by there, and even a method call per part shows in the hub's CPU."""

    def __init__(self, meter: Meter) -> None:
        self.meter, self.wants_usage = meter, meter.client_wants_usage
        self.tokens, self.usage, self.last_events, self.pending = 0, None, b"", b""
        self.passed: list[bytes] = []  # events passed on and not counted yet
        self.engine_answered = False  # a chunk with choices went by: the engine took the prompt

    def feed(self, part: bytes) -> bytes:
        """What to send of this part: its whole events (a split event's head waits for its tail)."""
        if not self.pending and part.endswith(b"\n\n"):
            ready = part  # whole events, as engines write them: no copy
        else:
            self.pending += part
            end = self.pending.rfind(b"\n\n")
            if end < 0:
                return b""
            ready, self.pending = self.pending[:end + 2], self.pending[end + 2:]
        if b'"usage"' in ready or (self.wants_usage and ready.endswith(b"data: [DONE]\n\n")):
            return self._watch(ready)
        self._keep(ready)
        if self.wants_usage:
            self.last_events = ready  # whose id and model a made usage chunk takes
        return ready

    def end(self) -> bytes:
        """The stream is over: what is left of it to send (a last event without its blank line)."""
        rest, self.pending = self.pending, b""
        self.close()
        return rest

    def close(self) -> None:
        """Record the usage, once: the engine's, else what was counted (a stream cut off included),
        and nothing for a stream no engine answered (a cold load that failed, or that the client
        left while it waited)."""
        if self.usage is not None:
            self.meter.finish(prompt_tokens=int(self.usage.get("prompt_tokens") or 0),
                              completion_tokens=int(self.usage.get("completion_tokens") or 0))
        else:
            completion = self.count()
            self.meter.finish(prompt_tokens=None if self.engine_answered else 0, completion_tokens=completion)

    def _keep(self, events: bytes) -> None:
        self.passed.append(events)
        if len(self.passed) >= COUNT_EVERY_PARTS:
            self.count()

    def count(self) -> int:
        """Count the tokens of the parts passed on since the last count; the total so far."""
        if self.passed:
            events = b"".join(self.passed)
            self.tokens += len(_TOKEN.findall(events))
            self.engine_answered = self.engine_answered or b'"choices"' in events
            self.passed.clear()  # in place: a sender may hold the list
        return self.tokens

    def _watch(self, events: bytes) -> bytes:
        """Events that hold a usage chunk or (the client asking for usage) the end."""
        if not self.wants_usage and (found := self._usage_dropped(events)) is not None:
            return found
        kept = []
        for event in events.split(b"\n\n"):
            if not event:
                continue
            if event.startswith(b"data: [DONE]") and self.wants_usage and self.usage is None:
                kept.append(self._made_usage_event())
            elif _USAGE.search(event):
                try:
                    chunk = json.loads(event[event.index(b"{"):])
                except ValueError:
                    chunk = None
                if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                    self.usage = chunk["usage"]
                    if not chunk.get("choices") and not self.wants_usage:
                        continue  # the chunk Porten asked for, not the client
            else:
                self._keep(event)
                if event.startswith(b"data: {"):
                    self.last_events = event
            kept.append(event)
        return b"".join(event + b"\n\n" for event in kept)

    def _usage_dropped(self, events: bytes) -> bytes | None:
        """The common case, as engines end a stream the client asked no usage of: one usage chunk
        with no choices among whole events. `events` less that chunk, its usage kept; None for
        anything else (the event by event reading above handles it). Read with bytes' own searches
        and two anchored patterns, not json: this runs at the end of every stream."""
        at = events.find(b'"usage"')
        start = events.rfind(b"\n\n", 0, at) + 2 if at > 0 else 0
        start = 0 if start == 1 else start  # no blank line before it: the first event
        end = events.find(b"\n\n", at)
        if at < 0 or end < 0 or events.find(b'"usage"', end) >= 0 or not events.startswith(b"data: {", start):
            return None
        choices = events.find(b'"choices"', start, end)
        if choices >= 0 and not _NO_CHOICES.match(events, choices, end):
            return None
        if not _USAGE.match(events, at, end) or (prompt := _PROMPT_TOKENS.search(events, at, end)) is None \
                or (completion := _COMPLETION_TOKENS.search(events, at, end)) is None:
            return None
        self.usage = {"prompt_tokens": int(prompt[1]), "completion_tokens": int(completion[1])}
        return events[:start] + events[end + 2:]

    def _made_usage_event(self) -> bytes:
        prompt, completion = self.meter.estimated_prompt_tokens, self.count()
        self.usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        last = self.last_events.rstrip()
        start = last.rfind(b"data: {")
        try:
            last = json.loads(last[start + len(b"data: "):]) if start >= 0 else {}
        except ValueError:
            last = {}
        chunk = {key: last[key] for key in ("id", "object", "created", "model") if key in last}
        chunk.update({"choices": [], "usage": self.usage})
        return b"data: " + json.dumps(chunk).encode()


async def metered(source: AsyncIterator[bytes], stream_meter: StreamMeter) -> AsyncIterator[bytes]:
    """`source` through `stream_meter`, as an async iterator (for Django's handler, which iterates
    a response's streaming_content; the gateway's own app feeds the meter as it sends)."""
    passed = None if stream_meter.wants_usage else stream_meter.passed
    try:
        async for part in source:
            if passed is not None and not stream_meter.pending and part.endswith(b"\n\n") \
                    and b'"usage"' not in part:
                passed.append(part)  # the common part, kept as StreamMeter says
                if len(passed) >= COUNT_EVERY_PARTS:
                    stream_meter.count()
                yield part
            elif out := stream_meter.feed(part):
                yield out
        if rest := stream_meter.end():
            yield rest
    finally:
        stream_meter.close()

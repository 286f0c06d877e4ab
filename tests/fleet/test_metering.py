"""StreamMeter: however an engine's stream is cut into reads, the client gets the events as sent,
less the usage chunk it did not ask for (or plus one it asked for and the engine did not send), and
the meter records what the client was told."""
from __future__ import annotations

import json
import uuid

import pytest
import redis

from fleet.gateway.metering import Meter, StreamMeter, metered


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


ROLE = _event({"id": "a", "object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant"}}]})
TOKENS = [_event({"id": "a", "choices": [{"delta": {"content": f"t{i}"}}]}) for i in range(5)]
END = _event({"id": "a", "choices": [{"delta": {}, "finish_reason": "length"}]})
USAGE = _event({"id": "a", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
DONE = b"data: [DONE]\n\n"
WITH_USAGE = ROLE + b"".join(TOKENS) + END + USAGE + DONE
WITHOUT_USAGE = ROLE + b"".join(TOKENS) + END + DONE


class Reads:
    """`blob` in reads of `size` bytes, or (size 0) an event a read, as engines write."""

    def __init__(self, blob: bytes, size: int) -> None:
        self.parts = iter([event + b"\n\n" for event in blob.split(b"\n\n")[:-1]] if size == 0 else
                          [blob[i:i + size] for i in range(0, len(blob), size)])

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self.parts)
        except StopIteration:
            raise StopAsyncIteration

    async def aclose(self) -> None:
        pass


async def _relay(blob: bytes, size: int, *, wants_usage: bool) -> tuple[bytes, dict]:
    meter = Meter(None, "m", None, estimated_prompt_tokens=7, client_wants_usage=wants_usage)
    recorded: dict = {}
    meter.finish = lambda **kw: recorded.update(kw)  # our own object: what it would record
    out = b"".join([part async for part in metered(Reads(blob, size), StreamMeter(meter))])
    return out, recorded


@pytest.mark.parametrize("size", [0, 1, 7, 13, 50, 10_000])
async def test_any_cut_of_the_stream_is_relayed_and_metered_alike(size):
    out, recorded = await _relay(WITH_USAGE, size, wants_usage=False)
    assert out == WITHOUT_USAGE and recorded == {"prompt_tokens": 3, "completion_tokens": 5}
    out, recorded = await _relay(WITH_USAGE, size, wants_usage=True)
    assert out == WITH_USAGE and recorded == {"prompt_tokens": 3, "completion_tokens": 5}
    out, recorded = await _relay(WITHOUT_USAGE, size, wants_usage=False)
    assert out == WITHOUT_USAGE and recorded == {"prompt_tokens": None, "completion_tokens": 5}
    out, recorded = await _relay(WITHOUT_USAGE, size, wants_usage=True)
    made = json.loads(out.split(b"\n\n")[-3][len(b"data: "):])
    assert made["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert made["choices"] == [] and made["id"] == "a" and out.endswith(DONE)
    assert recorded == {"prompt_tokens": 7, "completion_tokens": 5}


WARMING = b": warming downloading 40%\n\n"
FAILED = _event({"error": {"message": "The model could not be loaded.", "type": "server_error",
                           "code": "model_load_failed", "status": 503}})


@pytest.mark.parametrize("size", [0, 1, 13, 10_000])
async def test_a_stream_no_engine_answered_records_nothing_used(size):
    # A cold load that failed: keep-alive comments, then the error event. Nothing reached an engine.
    out, recorded = await _relay(WARMING + FAILED, size, wants_usage=False)
    assert out == WARMING + FAILED and recorded == {"prompt_tokens": 0, "completion_tokens": 0}
    out, recorded = await _relay(WARMING + WARMING, size, wants_usage=True)  # the client left while it waited
    assert out == WARMING + WARMING and recorded == {"prompt_tokens": 0, "completion_tokens": 0}
    # Once the engine answered, a stream that ends without usage still charges the estimated prompt.
    out, recorded = await _relay(WARMING + ROLE + TOKENS[0], size, wants_usage=False)
    assert recorded == {"prompt_tokens": None, "completion_tokens": 1}


# Usage chunks as engines write them: llama.cpp's server (keys sorted, no spaces), vLLM's (more
# fields), and one whose chunk still has a choice (vLLM's continuous usage): each is read, and only
# a chunk without choices is dropped.
LLAMA_USAGE = (b'data: {"choices":[],"created":1,"id":"a","model":"m","object":"chat.completion.chunk",'
               b'"usage":{"completion_tokens":5,"prompt_tokens":3,"total_tokens":8}}\n\n')
VLLM_USAGE = _event({"id": "a", "object": "chat.completion.chunk", "choices": [],
                     "usage": {"prompt_tokens": 3, "total_tokens": 8, "completion_tokens": 5,
                               "prompt_tokens_details": None}})
WITH_CHOICE = _event({"id": "a", "choices": [{"delta": {}, "finish_reason": "length"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})


@pytest.mark.parametrize("size", [0, 7, 10_000])
@pytest.mark.parametrize("usage, dropped", [(LLAMA_USAGE, True), (VLLM_USAGE, True), (WITH_CHOICE, False)])
async def test_engines_usage_chunks_are_read_and_dropped_only_without_choices(size, usage, dropped):
    out, recorded = await _relay(ROLE + b"".join(TOKENS) + usage + DONE, size, wants_usage=False)
    assert recorded == {"prompt_tokens": 3, "completion_tokens": 5}
    assert out == ROLE + b"".join(TOKENS) + (b"" if dropped else usage) + DONE


async def test_a_tally_redis_refused_is_kept_for_the_next_flush_and_counted_once(settings):
    """Usage a hub could not write to Redis goes with its next write; the token counter, added to
    at each flush, counts it once."""
    from porten.loops import forget_loop_objects
    from porten.metrics import HUB
    from porten.redis import aredis_client
    from porten.scopes import Scope
    from porten.usage import PENDING_KEY

    from fleet.gateway.usage import UsageTally

    model, redis_url = f"tally-{uuid.uuid4().hex[:8]}", settings.REDIS_URL
    scope = Scope(bucket="key:tally", api_key_id=987_654)
    tally = UsageTally()

    def counted(kind: str) -> float | None:
        return HUB.get_sample_value("porten_tokens_total", {"model": model, "kind": kind})

    try:
        settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
        forget_loop_objects()
        tally.add(scope, model, prompt_tokens=3, completion_tokens=5)
        await tally.flush()
        assert (counted("prompt"), counted("completion")) == (3, 5)
        fields = redis.Redis.from_url(redis_url, decode_responses=True).hkeys(PENDING_KEY)
        assert not [name for name in fields if f"|{model}|" in name], "not written"
        tally.add(scope, model, prompt_tokens=1, completion_tokens=1)
        settings.REDIS_URL = redis_url
        forget_loop_objects()
        await tally.flush()
        assert (counted("prompt"), counted("completion")) == (4, 6), "counted once"
        written = {name: int(amount) for name, amount in (await aredis_client().hgetall(PENDING_KEY)).items()
                   if f"|{model}|" in name}
        assert {name[-1]: amount for name, amount in written.items()} == {"r": 2, "p": 4, "c": 6}
        await aredis_client().hdel(PENDING_KEY, *written)
    finally:
        if tally.task is not None:
            tally.task.cancel()
        settings.REDIS_URL = redis_url
        forget_loop_objects()

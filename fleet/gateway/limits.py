"""Rate, token and concurrency limits per key (or per signed-in person), counted in Redis so that
every hub process shares them: one script call per request, answered with OpenAI's headers.

Requests and tokens are token buckets that fill at their per-minute rate up to one minute's worth:
a request takes one request and its estimated prompt tokens when it arrives, and the engine's usage
settles the tokens when it answers. Redis unavailable: limits fail open (logged), the request goes on.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from porten.redis import aredis_client
from porten.scopes import Scope

logger = logging.getLogger(__name__)

TTL_MS = 120_000  # a bucket untouched for two minutes is full again: it can go

# KEYS: requests bucket, tokens bucket, concurrency counter.
# ARGV: now (ms), rpm (0: none), tpm (0: none), estimated tokens, concurrent (0: none), TTL (ms).
# Returns {allowed (1/0), what ran out ("requests"/"tokens"/"concurrent"/""), wait (ms),
#          requests left, tokens left}.
TAKE = """
local now = tonumber(ARGV[1])
local rpm, tpm, est, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, t = tonumber(v[1]), tonumber(v[2])
  if not l then return cap end
  if not t then t = now end
  return math.min(cap, l + math.max(0, now - t) * cap / 60000)
end
local rl, tl = -1, -1
if rpm > 0 then rl = level(KEYS[1], rpm) end
if tpm > 0 then tl = level(KEYS[2], tpm) end
local wait, out = 0, ''
if rpm > 0 and rl < 1 then wait = math.ceil((1 - rl) * 60000 / rpm); out = 'requests' end
local need = math.min(est, tpm)
if tpm > 0 and tl < need then
  local w = math.ceil((need - tl) * 60000 / tpm)
  if w > wait then wait = w; out = 'tokens' end
end
if conc > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= conc then
  out = 'concurrent'; if wait < 1000 then wait = 1000 end
end
if out ~= '' then return {0, out, wait, math.floor(math.max(rl, 0)), math.floor(math.max(tl, 0))} end
if rpm > 0 then rl = rl - 1; redis.call('HSET', KEYS[1], 'l', rl, 't', now); redis.call('PEXPIRE', KEYS[1], ARGV[6]) end
if tpm > 0 then tl = tl - est; redis.call('HSET', KEYS[2], 'l', tl, 't', now); redis.call('PEXPIRE', KEYS[2], ARGV[6]) end
if conc > 0 then redis.call('INCR', KEYS[3]); redis.call('PEXPIRE', KEYS[3], 3600000) end
return {1, '', 0, math.floor(math.max(rl, 0)), math.floor(math.max(tl, 0))}
"""

# KEYS: tokens bucket, concurrency counter. ARGV: tokens to give back (negative: to charge), release (1/0).
SETTLE = """
if tonumber(ARGV[1]) ~= 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'l', ARGV[1])
end
if ARGV[2] == '1' and tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
return 1
"""


def _keys(bucket: str) -> list[str]:
    return [f"porten:rl:{bucket}:req", f"porten:rl:{bucket}:tok", f"porten:rl:{bucket}:conc"]


def _duration(seconds: float) -> str:
    """As OpenAI writes its reset headers: 1s, 6m0s, 250ms."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass
class Taken:
    """What a request took from its caller's limits: the headers for its answer, and what to settle."""

    scope: Scope
    estimated_tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    counted: bool = False  # False when Redis failed: nothing to settle
    settled: bool = False


class RateLimited(Exception):
    def __init__(self, what: str, retry_after_s: int, headers: dict[str, str]) -> None:
        super().__init__(what)
        self.what, self.retry_after_s, self.headers = what, retry_after_s, headers


_last_warning = 0.0


def _warn_open(exc: Exception) -> None:
    global _last_warning
    if time.monotonic() - _last_warning > 60:
        _last_warning = time.monotonic()
        logger.warning("rate limits are not enforced: Redis is unavailable (%s); requests are served", exc)


def _headers(scope: Scope, requests_left: int, tokens_left: int) -> dict[str, str]:
    headers = {}
    if scope.rpm:
        headers["x-ratelimit-limit-requests"] = str(scope.rpm)
        headers["x-ratelimit-remaining-requests"] = str(requests_left)
        headers["x-ratelimit-reset-requests"] = _duration((scope.rpm - requests_left) * 60 / scope.rpm)
    if scope.tpm:
        headers["x-ratelimit-limit-tokens"] = str(scope.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(tokens_left)
        headers["x-ratelimit-reset-tokens"] = _duration((scope.tpm - tokens_left) * 60 / scope.tpm)
    return headers


async def limits_take(scope: Scope, *, estimated_tokens: int) -> Taken:
    """Take one request and its estimated tokens (and a concurrency slot) from the caller's limits;
    raises RateLimited when one has run out."""
    taken = Taken(scope=scope, estimated_tokens=estimated_tokens)
    if not scope.limited:
        return taken
    try:
        allowed, what, wait_ms, requests_left, tokens_left = await aredis_client().eval(
            TAKE, 3, *_keys(scope.bucket), int(time.time() * 1000), scope.rpm or 0, scope.tpm or 0,
            estimated_tokens, scope.concurrent or 0, TTL_MS)
    except Exception as exc:
        _warn_open(exc)
        return taken
    what = what.decode() if isinstance(what, bytes) else what
    taken.headers = _headers(scope, int(requests_left), int(tokens_left))
    if not allowed:
        raise RateLimited(what, max(1, math.ceil(int(wait_ms) / 1000)), taken.headers)
    taken.counted = True
    return taken


async def limits_settle(taken: Taken, *, used_tokens: int | None) -> None:
    """The request is over: give back its concurrency slot, and settle its tokens on what the engine
    used (None: the estimate stands)."""
    if not taken.counted or taken.settled:
        return
    taken.settled = True
    scope = taken.scope
    refund = 0 if (used_tokens is None or not scope.tpm) else taken.estimated_tokens - used_tokens
    if refund == 0 and not scope.concurrent:
        return
    keys = _keys(scope.bucket)
    try:
        await aredis_client().eval(SETTLE, 2, keys[1], keys[2], refund, 1 if scope.concurrent else 0)
    except Exception as exc:
        _warn_open(exc)


def estimated_prompt_tokens(raw_body: bytes) -> int:
    """A prompt's tokens before the engine has counted them: about four bytes of JSON each."""
    return max(1, len(raw_body) // 4)

"""Rate, token and concurrency limits per key (or per signed-in person), counted in Redis so that
every hub process shares them, answered with OpenAI's headers.

Requests and tokens are token buckets that fill at their per-minute rate up to one minute's worth:
a request takes one request and its estimated prompt tokens when it arrives, and the engine's usage
settles the tokens when it answers. A hub process that asks Redis for a request also takes a lease
of what the bucket refills in LEASE_S (when that is 2 or more) and spends it locally until it runs
out or LEASE_S passes: a busy key costs a Redis round trip a second per process, not one per
request, and the processes together never take more than the bucket holds. A lease half spent (in
time or in amount) is topped up in the background while it is still spent, so that a busy key's
requests never wait for Redis: waiting, the requests that came meanwhile were let go together, and
clients that arrive together stay in step. Concurrency is counted
in Redis on every request (a slot must be given back exactly). Redis unavailable: limits fail open
(logged), the request goes on.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

from porten.loops import per_loop
from porten.redis import aredis_client
from porten.scopes import Scope

logger = logging.getLogger(__name__)

TTL_MS = 120_000  # a bucket untouched for two minutes is full again: it can go
LEASE_S = 1.0  # a process's lease is what the bucket refills in this long, spent within it

# KEYS: requests bucket, tokens bucket, concurrency counter.
# ARGV: now (ms), rpm (0: none), tpm (0: none), estimated tokens, concurrent (0: none), TTL (ms),
#       requests and tokens wanted as a lease, requests and tokens of a lapsed lease given back,
#       1 when a request takes its own share (0: a lease topped up, nothing of its own).
# Returns {allowed (1/0), what ran out ("requests"/"tokens"/"concurrent"/""), wait (ms),
#          requests left, tokens left, requests leased, tokens leased}.
TAKE = """
local now = tonumber(ARGV[1])
local rpm, tpm, est, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local want_r, want_t, back_r, back_t = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local own = tonumber(ARGV[11])
local function level(key, cap, back)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, t = tonumber(v[1]), tonumber(v[2])
  if not l then return cap end
  if not t then t = now end
  return math.min(cap, l + back + math.max(0, now - t) * cap / 60000)
end
local rl, tl = -1, -1
if rpm > 0 then rl = level(KEYS[1], rpm, back_r) end
if tpm > 0 then tl = level(KEYS[2], tpm, back_t) end
local wait, out = 0, ''
if own == 1 and rpm > 0 and rl < 1 then wait = math.ceil((1 - rl) * 60000 / rpm); out = 'requests' end
local need = math.min(est, tpm)
if tpm > 0 and tl < need then
  local w = math.ceil((need - tl) * 60000 / tpm)
  if w > wait then wait = w; out = 'tokens' end
end
if conc > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= conc then
  out = 'concurrent'; if wait < 1000 then wait = 1000 end
end
if out ~= '' then
  -- a lapsed lease given back still goes back
  if rpm > 0 and back_r > 0 then redis.call('HSET', KEYS[1], 'l', rl, 't', now) end
  if tpm > 0 and back_t > 0 then redis.call('HSET', KEYS[2], 'l', tl, 't', now) end
  return {0, out, wait, math.floor(math.max(rl, 0)), math.floor(math.max(tl, 0)), 0, 0}
end
local got_r, got_t = 0, 0
if rpm > 0 then
  rl = rl - own
  got_r = math.max(0, math.min(want_r, math.floor(rl)))
  rl = rl - got_r
  redis.call('HSET', KEYS[1], 'l', rl, 't', now); redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
if tpm > 0 then
  tl = tl - est
  got_t = math.max(0, math.min(want_t, math.floor(tl)))
  tl = tl - got_t
  redis.call('HSET', KEYS[2], 'l', tl, 't', now); redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
if conc > 0 then redis.call('INCR', KEYS[3]); redis.call('PEXPIRE', KEYS[3], 3600000) end
return {1, '', 0, math.floor(math.max(rl, 0)), math.floor(math.max(tl, 0)), got_r, got_t}
"""

# KEYS: tokens bucket, concurrency counter. ARGV: tokens to give back (negative: to charge), slots to release.
SETTLE = """
if tonumber(ARGV[1]) ~= 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'l', ARGV[1])
end
local release = tonumber(ARGV[2])
if release > 0 then
  local held = tonumber(redis.call('GET', KEYS[2]) or '0')
  if held > 0 then redis.call('DECRBY', KEYS[2], math.min(release, held)) end
end
return 1
"""
SETTLE_EVERY_S = 0.01  # settlements gathered this long go out together, off every answer's path


def _scripts():
    """This loop's two scripts, sent by their SHA after the first call."""
    client = aredis_client()
    return client.register_script(TAKE), client.register_script(SETTLE)


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
    """OpenAI's headers. What is left counts this process's lease with the bucket, up to the limit
    (a lease topped up while the bucket refilled would count past it)."""
    headers = {}
    if scope.rpm:
        requests_left = min(requests_left, scope.rpm)
        headers["x-ratelimit-limit-requests"] = str(scope.rpm)
        headers["x-ratelimit-remaining-requests"] = str(requests_left)
        headers["x-ratelimit-reset-requests"] = _duration((scope.rpm - requests_left) * 60 / scope.rpm)
    if scope.tpm:
        tokens_left = min(tokens_left, scope.tpm)
        headers["x-ratelimit-limit-tokens"] = str(scope.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(tokens_left)
        headers["x-ratelimit-reset-tokens"] = _duration((scope.tpm - tokens_left) * 60 / scope.tpm)
    return headers


@dataclass
class Lease:
    """Requests and tokens this process took from a bucket ahead of use, until `until` (monotonic);
    topped up in the background from `renew_at` on, or once half of it is spent."""

    requests: int
    tokens: int
    until: float
    requests_left: int  # the bucket's levels when it was granted, for the headers
    tokens_left: int
    wanted_requests: int = 0  # what a lease of this key holds when full
    wanted_tokens: int = 0
    renew_at: float = 0.0
    renewal: asyncio.Task | None = None  # the top-up on its way (held here: the loop keeps no reference)

    def due(self, now: float) -> bool:
        return (self.renewal is None or self.renewal.done()) and (
            now >= self.renew_at or self.requests * 2 < self.wanted_requests or self.tokens * 2 < self.wanted_tokens)


def _leases() -> dict[str, Lease]:
    return {}


def _from_lease(scope: Scope, estimated_tokens: int) -> Lease | None:
    if scope.concurrent:
        return None
    lease = per_loop(_leases).get(scope.bucket)
    now = time.monotonic()
    if lease is None or lease.until < now:
        return None
    if (scope.rpm and lease.requests < 1) or (scope.tpm and lease.tokens < estimated_tokens):
        return None
    lease.requests -= 1 if scope.rpm else 0
    lease.tokens -= estimated_tokens if scope.tpm else 0
    if lease.due(now):
        lease.renewal = asyncio.get_running_loop().create_task(_top_up(scope, lease), name="porten-lease")
    return lease


def _wanted(scope: Scope) -> tuple[int, int]:
    """What a lease of this scope holds when full: (0, 0) where it gets none."""
    if scope.concurrent:
        return 0, 0
    want_r = int(scope.rpm * LEASE_S / 60) if scope.rpm else 0
    want_t = int(scope.tpm * LEASE_S / 60) if scope.tpm else 0
    return (want_r, want_t) if want_r >= 2 or (not scope.rpm and want_t >= 2) else (0, 0)


async def _top_up(scope: Scope, lease: Lease) -> None:
    """Fill a lease in use back to what it holds when full, and give it another LEASE_S."""
    try:
        take, _ = per_loop(_scripts)
        _, _, _, requests_left, tokens_left, got_r, got_t = await take(
            keys=_keys(scope.bucket), args=[
                int(time.time() * 1000), scope.rpm or 0, scope.tpm or 0, 0, 0, TTL_MS,
                max(lease.wanted_requests - lease.requests, 0) if lease.wanted_requests else 0,
                max(lease.wanted_tokens - lease.tokens, 0) if lease.wanted_tokens else 0, 0, 0, 0])
    except Exception as exc:
        _warn_open(exc)  # the lease runs out or lapses as it would have; the next request asks again
        return
    _granted(lease, int(got_r), int(got_t), int(requests_left), int(tokens_left))


def _granted(lease: Lease, requests: int, tokens: int, requests_left: int, tokens_left: int) -> None:
    """Redis added `requests` and `tokens` to this lease: spend them within LEASE_S."""
    now = time.monotonic()
    lease.requests += requests
    lease.tokens += tokens
    lease.requests_left, lease.tokens_left = requests_left, tokens_left
    lease.until, lease.renew_at = now + LEASE_S, now + LEASE_S / 2


async def limits_take(scope: Scope, *, estimated_tokens: int) -> Taken:
    """Take one request and its estimated tokens (and a concurrency slot) from the caller's limits;
    raises RateLimited when one has run out."""
    taken = Taken(scope=scope, estimated_tokens=estimated_tokens)
    if not scope.limited:
        return taken
    if (lease := _from_lease(scope, estimated_tokens)) is not None:
        taken.headers = _headers(scope, lease.requests_left + lease.requests, lease.tokens_left + max(lease.tokens, 0))
        taken.counted = True
        return taken
    leases = per_loop(_leases)
    want_r, want_t = _wanted(scope)
    back_r = back_t = 0
    if (lease := leases.get(scope.bucket)) is not None:
        # Lapsed, or too little for this request: what is left of it goes back to the bucket.
        back_r, back_t, lease.requests, lease.tokens = lease.requests, lease.tokens, 0, 0
        lease.wanted_requests, lease.wanted_tokens = want_r, want_t  # the key's limits may have changed
    try:
        take, _ = per_loop(_scripts)
        allowed, what, wait_ms, requests_left, tokens_left, got_r, got_t = await take(
            keys=_keys(scope.bucket), args=[
                int(time.time() * 1000), scope.rpm or 0, scope.tpm or 0, estimated_tokens, scope.concurrent or 0,
                TTL_MS, want_r, want_t, back_r, back_t, 1])
    except Exception as exc:
        _warn_open(exc)
        return taken
    what = what.decode() if isinstance(what, bytes) else what
    taken.headers = _headers(scope, int(requests_left) + int(got_r), int(tokens_left) + int(got_t))
    if not allowed:
        raise RateLimited(what, max(1, math.ceil(int(wait_ms) / 1000)), taken.headers)
    if int(got_r) or int(got_t):
        if (lease := leases.get(scope.bucket)) is None:
            lease = leases[scope.bucket] = Lease(requests=0, tokens=0, until=0.0, requests_left=0, tokens_left=0,
                                                 wanted_requests=want_r, wanted_tokens=want_t)
        _granted(lease, int(got_r), int(got_t), int(requests_left), int(tokens_left))
    taken.counted = True
    return taken


def limits_settle(taken: Taken, *, used_tokens: int | None) -> None:
    """The request is over: give back its concurrency slot, and settle its tokens on what the engine
    used (None: the estimate stands). Gathered per bucket and sent within SETTLE_EVERY_S."""
    if not taken.counted or taken.settled:
        return
    taken.settled = True
    scope = taken.scope
    refund = 0 if (used_tokens is None or not scope.tpm) else taken.estimated_tokens - used_tokens
    if refund and not scope.concurrent and (lease := per_loop(_leases).get(scope.bucket)) is not None:
        lease.tokens += refund  # settled into this process's lease: given back with it when it lapses
        return
    if refund or scope.concurrent:
        per_loop(Settlements).add(scope.bucket, refund, 1 if scope.concurrent else 0)


class Settlements:
    """Token refunds and concurrency releases owed to Redis, summed per bucket."""

    def __init__(self) -> None:
        self.owed: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.task: asyncio.Task | None = None

    def add(self, bucket: str, refund: int, release: int) -> None:
        owed = self.owed[bucket]
        owed[0] += refund
        owed[1] += release
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._send_soon(), name="porten-settle")

    async def _send_soon(self) -> None:
        await asyncio.sleep(SETTLE_EVERY_S)
        owed, self.owed = self.owed, defaultdict(lambda: [0, 0])
        try:
            _, settle = per_loop(_scripts)
            pipe = aredis_client().pipeline(transaction=False)
            for bucket, (refund, release) in owed.items():
                keys = _keys(bucket)
                await settle(keys=[keys[1], keys[2]], args=[refund, release], client=pipe)
            await pipe.execute()
        except Exception as exc:
            _warn_open(exc)


def estimated_prompt_tokens(raw_body: bytes) -> int:
    """A prompt's tokens before the engine has counted them: about four bytes of JSON each."""
    return max(1, len(raw_body) // 4)

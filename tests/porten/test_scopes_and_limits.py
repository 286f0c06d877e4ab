"""Scopes (a key's models and limits within its owner's policy) and the Redis limits behind them."""
from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone

from fleet.gateway.limits import SETTLE_EVERY_S, RateLimited, limits_settle, limits_take
from porten.keys import OutsidePolicy, api_key_create, api_key_create_own
from porten.models import AccessPolicy
from porten.redis import aredis_client, redis_client, reset_clients
from porten.scopes import Scope, key_scope, policy_for, user_scope


@pytest.fixture
def person(db):
    return get_user_model().objects.create_user("sam", password="pw-123456")


@pytest.mark.django_db
def test_a_key_is_bounded_by_its_owners_policy(person):
    AccessPolicy.objects.create(user=person, allowed_models=["a", "b"], rpm_limit=60, tpm_limit=None)
    key, _ = api_key_create(name="k", user=person, allowed_models=["b", "c"], rpm_limit=100, tpm_limit=5000)
    scope = key_scope(key)
    assert scope.models == frozenset({"b"}) and scope.rpm == 60 and scope.tpm == 5000 and scope.concurrent is None
    assert scope.allows("b") and not scope.allows("a") and not scope.allows("c")
    assert (scope.api_key_id, scope.user_id) == (key.pk, person.pk)


@pytest.mark.django_db
def test_group_policies_merge_generously_and_a_persons_own_wins(person):
    small, big = Group.objects.create(name="small"), Group.objects.create(name="big")
    person.groups.add(small, big)
    AccessPolicy.objects.create(group=small, allowed_models=["a"], rpm_limit=10, max_keys=2)
    AccessPolicy.objects.create(group=big, allowed_models=["b"], rpm_limit=30, max_keys=5)
    merged = policy_for(person)
    assert merged.allowed_models == ["a", "b"] and merged.rpm_limit == 30 and merged.max_keys == 5
    AccessPolicy.objects.create(user=person, allowed_models=["c"])
    assert policy_for(person).allowed_models == ["c"]
    staff = get_user_model().objects.create_user("op", password="pw-123456", is_staff=True)
    staff.groups.add(small)
    assert user_scope(staff).models is None


@pytest.mark.django_db
def test_own_keys_stay_within_the_policy(person):
    policy = AccessPolicy.objects.create(user=person, allowed_models=["a", "b"], rpm_limit=60, max_keys=3)
    key, raw = api_key_create_own(user=person, name="mine", allowed_models=["a"])
    assert key.rpm_limit == 60 and key.allowed_models == ["a"] and raw.startswith("pt-")
    everything, _ = api_key_create_own(user=person, name="all")
    assert everything.allowed_models == ["a", "b"], "an empty choice means what the policy allows, not all"
    for kwargs, words in [({"allowed_models": ["z"]}, "only"), ({"rpm_limit": 61}, "at most 60")]:
        with pytest.raises(OutsidePolicy, match=words):
            api_key_create_own(user=person, name="x", **kwargs)
    policy.max_keys = 2
    policy.save()
    with pytest.raises(OutsidePolicy, match="2 active keys"):
        api_key_create_own(user=person, name="third")
    with pytest.raises(ValueError, match="future"):
        api_key_create(name="old", expires_at=timezone.now() - timedelta(seconds=1))


@pytest.fixture
async def bucket():
    name = f"test-{id(object())}"
    yield name
    await aredis_client().delete(*[f"porten:rl:{name}:{k}" for k in ("req", "tok", "conc")])


async def _settled() -> None:
    await asyncio.sleep(SETTLE_EVERY_S * 5)  # settlements go out in batches, off the request's path


async def test_requests_per_minute_run_out_with_openai_headers_and_a_retry_after(bucket):
    scope = Scope(bucket=bucket, rpm=3)
    remaining = []
    for _ in range(3):
        taken = await limits_take(scope, estimated_tokens=10)
        remaining.append(taken.headers["x-ratelimit-remaining-requests"])
        assert taken.headers["x-ratelimit-limit-requests"] == "3"
    assert remaining == ["2", "1", "0"]
    with pytest.raises(RateLimited) as limited:
        await limits_take(scope, estimated_tokens=10)
    assert limited.value.what == "requests" and 1 <= limited.value.retry_after_s <= 20
    assert limited.value.headers["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_are_taken_at_arrival_and_settled_on_usage(bucket):
    scope = Scope(bucket=bucket, tpm=1000)
    first = await limits_take(scope, estimated_tokens=600)
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    with pytest.raises(RateLimited) as limited:
        await limits_take(scope, estimated_tokens=600)
    assert limited.value.what == "tokens"
    limits_settle(first, used_tokens=100)  # the engine used less than estimated: 500 back
    await _settled()
    second = await limits_take(scope, estimated_tokens=600)
    assert 290 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 310
    limits_settle(second, used_tokens=600)
    limits_settle(second, used_tokens=0)  # settling twice changes nothing
    await _settled()
    third = await limits_take(scope, estimated_tokens=10)
    assert 280 <= int(third.headers["x-ratelimit-remaining-tokens"]) <= 310


async def test_concurrency_is_held_until_settled(bucket):
    scope = Scope(bucket=bucket, concurrent=2)
    one, two = await limits_take(scope, estimated_tokens=1), await limits_take(scope, estimated_tokens=1)
    with pytest.raises(RateLimited) as limited:
        await limits_take(scope, estimated_tokens=1)
    assert limited.value.what == "concurrent"
    limits_settle(one, used_tokens=None)
    await _settled()
    three = await limits_take(scope, estimated_tokens=1)
    limits_settle(two, used_tokens=None)
    limits_settle(three, used_tokens=None)
    await _settled()
    assert await aredis_client().get(f"porten:rl:{bucket}:conc") in (b"0", "0")


async def test_limits_fail_open_when_redis_is_unreachable(bucket, settings, caplog):
    scope = Scope(bucket=bucket, rpm=1)
    await limits_take(scope, estimated_tokens=1)
    working_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    reset_clients()
    try:
        taken = await limits_take(scope, estimated_tokens=1)  # over the limit, but nothing can count it
        assert taken.counted is False and taken.headers == {}
        assert "not enforced" in caplog.text
    finally:
        settings.REDIS_URL = working_url
        reset_clients()


def _take_at_once(scope: Scope, estimated_tokens: int):
    """limits_take run to its end without letting the loop run: its Taken, or None where it had to
    wait (for Redis)."""
    coroutine = limits_take(scope, estimated_tokens=estimated_tokens)
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    return None


async def test_a_busy_keys_lease_is_topped_up_before_it_lapses_and_no_request_waits(bucket):
    scope = Scope(bucket=bucket, rpm=6000, tpm=600_000)  # a lease: 100 requests and 10,000 tokens a second
    first = await limits_take(scope, estimated_tokens=10)  # the first asks Redis, and takes a lease
    assert first.counted and first.headers["x-ratelimit-limit-requests"] == "6000"
    started, served = time.monotonic(), 1
    while time.monotonic() - started < 2.5:  # past two lease lifetimes, 20 requests a second
        taken = _take_at_once(scope, 10)
        assert taken is not None, f"request {served + 1} waited for Redis"
        assert taken.counted and 0 < int(taken.headers["x-ratelimit-remaining-requests"]) <= 6000
        served += 1
        await asyncio.sleep(0.05)  # the loop runs: top-ups go out in the background
    assert served >= 40
    # What the bucket lost is what was served plus what this process holds in its lease.
    level = float((await aredis_client().hget(f"porten:rl:{bucket}:req", "l")))
    refilled = (time.monotonic() - started + 0.1) * 100
    assert 6000 - served - 200 <= level <= 6000, (level, served)
    assert level <= 6000 - served + refilled


def test_leases_never_let_two_processes_take_more_than_the_bucket_holds(db):
    """Two event loops (as two hub processes: each keeps its own leases) share a 600-a-minute key."""
    import threading

    name = f"test-lease-{id(object())}"
    scope = Scope(bucket=name, rpm=600)  # a lease is 10 requests
    allowed = []

    def one_process() -> None:
        async def spend() -> int:
            taken, refused = 0, 0
            try:
                while refused < 2:  # once refused, a top-up still on its way may land in the lease: spend it
                    try:
                        await limits_take(scope, estimated_tokens=1)
                        taken, refused = taken + 1, 0
                    except RateLimited:
                        refused += 1
                        await asyncio.sleep(0.05)
                return taken
            finally:
                await aredis_client().aclose()
        allowed.append(asyncio.run(spend()))

    threads = [threading.Thread(target=one_process) for _ in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    refilled = (time.monotonic() - started) * 600 / 60
    assert len(allowed) == 2 and all(n > 0 for n in allowed)
    assert 600 <= sum(allowed) <= 600 + refilled + 1, (allowed, refilled)
    redis_client().delete(*[f"porten:rl:{name}:{k}" for k in ("req", "tok", "conc")])

"""/v1 needs a Bearer API key; errors are OpenAI-shaped."""
import asyncio
import time

import pytest

from porten.models import ApiKey

pytestmark = pytest.mark.django_db


def assert_openai_401(response):
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == "invalid_api_key"
    assert "Bearer" in error["message"]


def test_missing_key_is_401(client):
    assert_openai_401(client.get("/v1/models"))


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer ", "Basic abc", "pt-only-token"])
def test_wrong_key_is_401(client, api_key, header):
    assert_openai_401(client.get("/v1/models", HTTP_AUTHORIZATION=header))


def test_right_key_is_accepted_and_use_is_recorded(client, api_key):
    assert ApiKey.objects.get().last_used_at is None
    response = client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {api_key}")
    assert response.status_code == 200
    assert ApiKey.objects.get().last_used_at is not None


def test_revoked_key_is_401(client, api_key):
    ApiKey.objects.update(is_active=False)
    assert_openai_401(client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {api_key}"))


def test_only_a_hash_is_stored(api_key):
    stored = ApiKey.objects.get()
    assert api_key not in (stored.key_hash, stored.prefix, stored.name)
    assert len(stored.key_hash) == 64


@pytest.mark.django_db(transaction=True)
async def test_the_async_check_knows_a_key_records_its_use_and_drops_it_once_revoked(api_key):
    from django.test import RequestFactory

    from porten import auth

    def request(key):
        return RequestFactory().post("/v1/chat/completions", HTTP_AUTHORIZATION=f"Bearer {key}")

    caller, via_session = await auth.authenticate_async(request(api_key))
    assert isinstance(caller, auth.ApiKeyUser) and via_session is False
    assert (await ApiKey.objects.aget()).last_used_at is not None
    assert await auth.authenticate_async(request("pt-wrong")) == (None, False)

    await ApiKey.objects.aupdate(is_active=False)
    assert (await auth.authenticate_async(request(api_key)))[0] is caller  # remembered for a few seconds
    # Near the end of its time, the answer still serves while the key is looked up again ...
    near_end = time.monotonic() - auth.KEY_TTL_S + auth.KEY_REFRESH_S / 2
    auth._keys.entries.update({key: (near_end, user) for key, (_, user) in auth._keys.entries.items()})
    assert (await auth.authenticate_async(request(api_key)))[0] is caller
    for _ in range(100):  # ... and once that lookup is back, the revoked key is refused
        await asyncio.sleep(0.02)
        if (await auth.authenticate_async(request(api_key)))[0] is None:
            break
    assert await auth.authenticate_async(request(api_key)) == (None, False)
    # Past KEY_TTL_S, an answer is never used: the key is looked up before it is answered.
    await ApiKey.objects.aupdate(is_active=True)
    assert (await auth.authenticate_async(request(api_key)))[0] is not None
    await ApiKey.objects.aupdate(is_active=False)
    past = time.monotonic() - auth.KEY_TTL_S - 0.01
    auth._keys.entries.update({key: (past, user) for key, (_, user) in auth._keys.entries.items()})
    assert await auth.authenticate_async(request(api_key)) == (None, False)


def test_repeated_bad_keys_from_one_address_are_slowed_down_with_429(client, api_key, settings):
    from porten.redis import redis_client

    settings.PORTEN_BAD_KEYS_PER_MINUTE = 3
    redis_client().delete("porten:bad-keys:127.0.0.1")
    statuses = [client.get("/v1/models", HTTP_AUTHORIZATION="Bearer pt-guess-%d" % i).status_code for i in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    slowed = client.get("/v1/models", HTTP_AUTHORIZATION="Bearer pt-guess-again")
    assert slowed.json()["error"]["code"] == "rate_limit_exceeded" and int(slowed["Retry-After"]) >= 1
    assert client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {api_key}").status_code == 200, "a valid key passes"
    redis_client().delete("porten:bad-keys:127.0.0.1")


@pytest.mark.django_db(transaction=True)
async def test_the_gateway_slows_repeated_bad_keys_too(async_client, settings):
    from porten.redis import redis_client

    settings.PORTEN_BAD_KEYS_PER_MINUTE = 2
    redis_client().delete("porten:bad-keys:127.0.0.1")
    statuses = []
    for i in range(4):
        response = await async_client.post("/v1/chat/completions", {"model": "m", "messages": []},
                                           content_type="application/json", headers={"Authorization": f"Bearer pt-no-{i}"})
        statuses.append(response.status_code)
    assert statuses == [401, 401, 429, 429]
    redis_client().delete("porten:bad-keys:127.0.0.1")


@pytest.mark.django_db(transaction=True)
def test_the_warming_endpoint_holds_a_caller_to_its_scope_and_can_be_closed_to_anonymous_callers(
        client, settings):
    from django.contrib.auth import get_user_model

    from porten.cache import clear_caches
    from porten.keys import api_key_create
    from porten.models import AccessPolicy
    from tests.factories import CatalogModelFactory

    CatalogModelFactory(model_id="open-model")
    CatalogModelFactory(model_id="other-model")
    scoped = api_key_create(name="scoped", allowed_models=["open-model"])[1]
    person = get_user_model().objects.create_user("wren", password="pw-123456")
    AccessPolicy.objects.create(user=person, allowed_models=["other-model"])
    clear_caches()

    def status(model: str, key: str | None = None) -> int:
        headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
        return client.get("/public/v1/models/warming", {"model": model}, **headers).status_code

    # Open (the default): anyone follows a load; a key or a session is held to its scope.
    assert (status("open-model"), status("other-model")) == (200, 200)
    assert (status("open-model", scoped), status("other-model", scoped)) == (200, 404)
    assert status("open-model", "pt-not-a-key") == 401
    client.force_login(person)
    assert (status("open-model"), status("other-model")) == (404, 200)
    client.logout()

    # Closed: a key or a session is needed, and the scope still holds.
    settings.PORTEN_PUBLIC_WARMING = False
    response = client.get("/public/v1/models/warming", {"model": "open-model"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert (status("open-model", scoped), status("other-model", scoped)) == (200, 404)
    client.force_login(person)
    assert (status("open-model"), status("other-model")) == (404, 200)

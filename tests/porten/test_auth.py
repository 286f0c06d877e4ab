"""/v1 needs a Bearer API key; errors are OpenAI-shaped."""
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

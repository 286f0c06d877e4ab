"""GET /healthz reports the database and the real test Redis."""
import pytest
from django.test import override_settings

from porten.redis import reset_clients

pytestmark = pytest.mark.django_db


def test_healthz_ok_against_real_redis(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"]["ok"] is True
    assert body["redis"]["ok"] is True


def test_healthz_reports_redis_down(client):
    reset_clients()
    try:
        with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
            response = client.get("/healthz")
    finally:
        reset_clients()
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["redis"]["ok"] is False and body["redis"]["error"]
    assert body["database"]["ok"] is True

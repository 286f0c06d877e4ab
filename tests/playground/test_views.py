"""The playground page (login only, the whole offered catalog) and POST /playground/prewarm."""
from __future__ import annotations

import json
import time

import pytest
from django.test import Client
from django.utils import timezone

from fleet.demand import demand_counts
from fleet.models import Instance, Node, Phase
from tests.factories import CatalogModelFactory

pytestmark = pytest.mark.django_db


def error_of(response) -> dict:
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code", "param"}
    return body["error"]


def csrf_client(person) -> tuple[Client, str]:
    """A signed-in browser that sends CSRF tokens only when told to."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(person)
    page = client.get("/playground/")
    assert page.status_code == 200
    return client, client.cookies["csrftoken"].value


def online_node(name: str = "play-node", memory_mb: int = 4096) -> Node:
    return Node.objects.create(
        name=name, gpus=[{"index": 0, "name": "cpu", "total_mb": memory_mb, "free_mb": memory_mb}],
        last_heartbeat_at=timezone.now(), agent_started_at=timezone.now(),
    )


def test_root_redirects_to_the_playground(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/playground/"


def test_the_page_requires_login(client):
    response = client.get("/playground/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/playground/"


def test_the_page_lists_the_offered_catalog_with_states(signed_in):
    CatalogModelFactory(model_id="pg-small", display_name="Small one", context_length=2048, supports_tools=True)
    CatalogModelFactory(model_id="pg-hidden", display_name="Hidden one", enabled=False)
    response = signed_in.get("/playground/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Small one" in html and 'data-model-id="pg-small"' in html
    assert "pg-hidden" not in html, "a disabled model is not offered"
    assert '<span class="badge badge-cold">cold</span>' in html
    assert "/static/playground/main.js" in html and "/static/playground/app.css" in html
    config = json.loads(html.split('<script id="playground-config" type="application/json">')[1].split("</script>")[0])
    [entry] = [m for m in config["catalog"] if m["id"] == "pg-small"]
    assert entry["context_length"] == 2048
    assert entry["capabilities"] == ["chat", "tools"]
    assert entry["state"]["phase"] == "idle"
    assert config["prewarmOnPick"] is True
    assert config["warmupBudgetS"] == 1800
    assert config["csrfToken"]


def test_the_page_escapes_catalog_text(signed_in):
    CatalogModelFactory(model_id="pg-xss", display_name="<script>alert(1)</script>")
    html = signed_in.get("/playground/").content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_page_shows_a_failed_load(signed_in):
    model = CatalogModelFactory(model_id="pg-failed")
    Instance.objects.create(model=model, node=online_node(), phase=Phase.FAILED, last_error="out of memory")
    html = signed_in.get("/playground/").content.decode()
    config = json.loads(html.split('<script id="playground-config" type="application/json">')[1].split("</script>")[0])
    [entry] = [m for m in config["catalog"] if m["id"] == "pg-failed"]
    assert entry["state"]["phase"] == "failed"
    assert entry["state"]["error"] == "out of memory"
    assert '<span class="badge badge-failed">failed</span>' in html


def test_prewarm_needs_a_session(client):
    CatalogModelFactory(model_id="pg-anon")
    response = client.post("/playground/prewarm", {"model": "pg-anon"}, content_type="application/json")
    assert response.status_code == 401
    assert error_of(response)["code"] == "not_authenticated"


def test_prewarm_enforces_csrf(person):
    CatalogModelFactory(model_id="pg-csrf")
    client, token = csrf_client(person)
    refused = client.post("/playground/prewarm", {"model": "pg-csrf"}, content_type="application/json")
    assert refused.status_code == 403
    assert error_of(refused)["code"] == "csrf_failed"
    wrong = client.post("/playground/prewarm", {"model": "pg-csrf"}, content_type="application/json",
                        HTTP_X_CSRFTOKEN="x" * 32)
    assert wrong.status_code == 403
    # With the token the check passes (no online node: the fleet says why it cannot place).
    accepted = client.post("/playground/prewarm", {"model": "pg-csrf"}, content_type="application/json",
                           HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code != 403


@pytest.mark.parametrize("body, status, code, param", [
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, "model"),
    (b'{"model": 7}', 400, None, "model"),
    (b'{"model": ""}', 400, None, "model"),
    (b'{"model": "no-such-model"}', 404, "model_not_found", "model"),
])
def test_prewarm_rejects_bad_input(person, body, status, code, param):
    client, token = csrf_client(person)
    response = client.post("/playground/prewarm", body, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == status
    error = error_of(response)
    assert error["code"] == code
    assert error["param"] == param


def test_prewarm_is_post_only(signed_in):
    response = signed_in.get("/playground/prewarm")
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


def test_prewarm_can_be_turned_off(person, settings):
    CatalogModelFactory(model_id="pg-off")
    settings.PORTEN_PREWARM_ON_PICK = False
    client, token = csrf_client(person)
    page = client.get("/playground/").content.decode()
    assert '"prewarmOnPick": false' in page
    response = client.post("/playground/prewarm", {"model": "pg-off"}, content_type="application/json",
                           HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 409
    assert error_of(response)["code"] == "prewarm_disabled"
    assert not Instance.objects.filter(model__model_id="pg-off").exists()


@pytest.mark.django_db(transaction=True)
def test_prewarm_places_a_cold_model_once_and_records_demand(person):
    online_node("pg-node-a")
    CatalogModelFactory(model_id="pg-cold", vram_mb=1024)
    client, token = csrf_client(person)
    before = demand_counts(["pg-cold"])["pg-cold"]
    response = client.post("/playground/prewarm", {"model": "pg-cold"}, content_type="application/json",
                           HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 200, response.content
    state = response.json()
    assert state["model"] == "pg-cold"
    assert state["phase"] == "queued"
    instance = Instance.objects.get(model__model_id="pg-cold")
    assert state["instance"] == instance.pk
    assert instance.node.name == "pg-node-a"
    assert demand_counts(["pg-cold"])["pg-cold"] == before + 1
    # A second pick finds the load under way: no second placement, no extra demand.
    again = client.post("/playground/prewarm", {"model": "pg-cold"}, content_type="application/json",
                        HTTP_X_CSRFTOKEN=token)
    assert again.status_code == 200
    assert again.json()["instance"] == instance.pk
    assert Instance.objects.filter(model__model_id="pg-cold").count() == 1
    assert demand_counts(["pg-cold"])["pg-cold"] == before + 1


@pytest.mark.django_db(transaction=True)
def test_prewarm_reports_no_capacity_in_the_openai_shape(person):
    online_node("pg-node-b", memory_mb=2048)
    CatalogModelFactory(model_id="pg-huge", vram_mb=90_000)
    client, token = csrf_client(person)
    started = time.monotonic()
    response = client.post("/playground/prewarm", {"model": "pg-huge"}, content_type="application/json",
                           HTTP_X_CSRFTOKEN=token)
    assert time.monotonic() - started < 10
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "no_capacity"
    assert error["message"]
    assert not Instance.objects.filter(model__model_id="pg-huge").exists()

"""The operator API under /api/: who may use it, catalog CRUD with the model's own validation, nodes,
instances (load now, unload), keys, and the audit log; errors in the OpenAI shape."""
from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from catalog.models import CatalogModel
from fleet.models import Instance, Node, Phase
from porten.models import ApiKey, AuditEntry
from porten.keys import api_key_create
from tests.factories import CatalogModelFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator_headers(db) -> dict[str, str]:
    _, raw = api_key_create(name="ops", role="operator")
    return {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def _json(client, method: str, url: str, headers: dict, body: dict | None = None):
    response = getattr(client, method)(url, data=json.dumps(body) if body is not None else None,
                                       content_type="application/json", **headers)
    return response, response.json() if response.content else None


def _online_node(name: str = "node-a", free_mb: int = 8000) -> Node:
    return Node.objects.create(name=name, address="127.0.0.1", gpus=[{"index": 0, "name": "cpu", "total_mb": free_mb,
                                                                      "free_mb": free_mb}],
                               last_heartbeat_at=timezone.now())


ENTRY = {
    "id": "tiny-chat", "display_name": "Tiny chat", "hf_repo": "porten-test/tiny", "hf_files": ["*.gguf"],
    "weight_format": "gguf", "engine": "llamacpp", "chat_format": "gemma", "context_length": 1024,
    "vram_mb": 900, "disk_mb": 250,
}


def test_no_key_gets_401_a_plain_key_403_an_operator_key_and_a_staff_session_200(client, auth_headers,
                                                                                  operator_headers):
    response, body = _json(client, "get", "/api/catalog/", {})
    assert response.status_code == 401
    assert body["error"]["code"] == "invalid_api_key"
    response, body = _json(client, "get", "/api/catalog/", auth_headers)
    assert response.status_code == 403
    assert body["error"]["code"] == "permission_denied" and "operator" in body["error"]["message"]
    assert _json(client, "get", "/api/catalog/", operator_headers)[0].status_code == 200

    person = get_user_model().objects.create_user("pat", password="pw-123456", is_staff=False)
    client.force_login(person)
    assert client.get("/api/nodes/").status_code == 403
    person.is_staff = True
    person.save()
    client.force_login(person)
    assert client.get("/api/nodes/").status_code == 200


def test_catalog_create_update_actions_delete_each_recorded(client, operator_headers):
    response, body = _json(client, "post", "/api/catalog/", operator_headers, ENTRY)
    assert response.status_code == 201, body
    assert body["id"] == "tiny-chat" and body["capabilities"] == ["chat"] and body["enabled"] is True
    assert CatalogModel.objects.filter(model_id="tiny-chat").exists()

    response, body = _json(client, "patch", "/api/catalog/tiny-chat/", operator_headers,
                           {"aliases": ["tiny"], "idle_ttl_s": 120, "engine_args": ["--n_threads", "2"]})
    assert response.status_code == 200, body
    assert body["aliases"] == ["tiny"] and body["idle_ttl_s"] == 120 and body["serving_args"] == ["--n_threads", "2"]

    response, body = _json(client, "post", "/api/catalog/tiny-chat/disable", operator_headers)
    assert response.status_code == 200 and body["enabled"] is False
    response, body = _json(client, "post", "/api/catalog/tiny-chat/pin", operator_headers)
    assert body["pinned"] is True

    response, _ = _json(client, "delete", "/api/catalog/tiny-chat/", operator_headers)
    assert response.status_code == 204
    assert not CatalogModel.objects.filter(model_id="tiny-chat").exists()
    actions = list(AuditEntry.objects.order_by("at", "pk").values_list("action", "target"))
    assert actions == [("catalog.create", "tiny-chat"), ("catalog.update", "tiny-chat"),
                       ("catalog.disable", "tiny-chat"), ("catalog.pin", "tiny-chat"), ("catalog.delete", "tiny-chat")]
    assert all(actor.startswith("key:ops") for actor in AuditEntry.objects.values_list("actor", flat=True))


@pytest.mark.parametrize("change, param, words", [
    ({"engine": "vllm"}, "engine", "cannot serve"),
    ({"engine_args": ["--port", "9999"]}, "engine_args", "set by Porten"),
    ({"engine_args": ["--n_ctx=4096"]}, "engine_args", "context_length"),
    ({"engine_args": "--n_threads 2"}, "engine_args", "list"),
    ({"aliases": ["Not A Slug"]}, "aliases", "not a valid name"),
    ({"aliases": ["other-model"]}, "aliases", "already names"),
    ({"context_length": 0}, "context_length", ""),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas", "max_replicas"),
])
def test_bad_entries_get_400_naming_the_field_and_change_nothing(client, operator_headers, change, param, words):
    CatalogModelFactory(model_id="other-model")
    before = CatalogModel.objects.count()
    response, body = _json(client, "post", "/api/catalog/", operator_headers, {**ENTRY, **change})
    assert response.status_code == 400, body
    assert body["error"]["param"] == param and words in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    assert CatalogModel.objects.count() == before
    assert not AuditEntry.objects.exists()


def test_an_alias_may_not_shadow_a_model_id_and_an_id_may_not_change(client, operator_headers):
    CatalogModelFactory(model_id="first", aliases=["shared-name"])
    response, body = _json(client, "post", "/api/catalog/", operator_headers, {**ENTRY, "id": "shared-name"})
    assert response.status_code == 400 and body["error"]["param"] == "id"
    response, body = _json(client, "patch", "/api/catalog/first/", operator_headers, {"id": "renamed"})
    assert response.status_code == 400 and body["error"]["param"] == "id"
    assert CatalogModel.objects.filter(model_id="first").exists()


def test_delete_is_refused_while_the_model_has_a_live_instance(client, operator_headers):
    model = CatalogModelFactory(model_id="busy")
    Instance.objects.create(model=model, node=_online_node(), phase=Phase.READY, vram_mb=model.vram_mb)
    response, body = _json(client, "delete", "/api/catalog/busy/", operator_headers)
    assert response.status_code == 409
    assert body["error"]["code"] == "model_in_use" and "node-a (ready)" in body["error"]["message"]
    assert CatalogModel.objects.filter(model_id="busy").exists()


def test_nodes_list_detail_drain_and_undrain(client, operator_headers):
    _online_node("node-a")
    response, body = _json(client, "get", "/api/nodes/", operator_headers)
    assert [n["name"] for n in body] == ["node-a"] and body[0]["online"] is True
    assert body[0]["memory_free_mb"] == 8000
    response, body = _json(client, "post", "/api/nodes/node-a/drain", operator_headers)
    assert response.status_code == 200 and body["draining"] is True
    assert Node.objects.get(name="node-a").draining
    response, body = _json(client, "post", "/api/nodes/node-a/undrain", operator_headers)
    assert body["draining"] is False
    response, body = _json(client, "get", "/api/nodes/nowhere/", operator_headers)
    assert response.status_code == 404 and body["error"]["code"] == "not_found"
    assert list(AuditEntry.objects.order_by("pk").values_list("action", flat=True)) == ["node.drain", "node.undrain"]


def test_load_now_places_on_the_named_node_and_unload_drains_it(client, operator_headers):
    model = CatalogModelFactory(model_id="loadable", vram_mb=1000)
    _online_node("node-a")
    _online_node("node-b")
    response, body = _json(client, "post", "/api/instances/", operator_headers, {"model": "loadable", "node": "node-b"})
    assert response.status_code == 202, body
    assert body["node"] == "node-b" and body["phase"] == "queued" and body["model"] == "loadable"
    instance = Instance.objects.get(pk=body["id"])
    assert instance.node.name == "node-b" and "operator" in instance.placement_reason

    # Asked again: the same live instance, not a second load.
    response, again = _json(client, "post", "/api/instances/", operator_headers, {"model": "loadable", "node": "node-b"})
    assert again["id"] == body["id"]
    # Elsewhere: refused, as the model allows one replica.
    response, refused = _json(client, "post", "/api/instances/", operator_headers, {"model": "loadable",
                                                                                    "node": "node-a"})
    assert response.status_code == 409 and refused["error"]["code"] == "max_replicas"

    Instance.objects.filter(pk=instance.pk).update(phase=Phase.READY)
    response, body = _json(client, "post", f"/api/instances/{instance.pk}/unload", operator_headers)
    assert response.status_code == 202 and body["phase"] == "draining"
    response, body = _json(client, "get", "/api/instances/?phase=draining", operator_headers)
    assert [i["id"] for i in body] == [instance.pk]
    response, body = _json(client, "post", f"/api/instances/{instance.pk}/unload", operator_headers)
    assert response.status_code == 409 and body["error"]["code"] == "not_loaded"
    assert model.instances.count() == 1


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope"}, 400, "model"),
    ({"model": "loadable", "node": "nowhere"}, 400, "node"),
    ({}, 400, "model"),
])
def test_load_now_bad_input(client, operator_headers, body, status, param):
    CatalogModelFactory(model_id="loadable")
    response, answer = _json(client, "post", "/api/instances/", operator_headers, body)
    assert response.status_code == status and answer["error"]["param"] == param
    assert not Instance.objects.exists()


def test_instance_list_rejects_bad_filters(client, operator_headers):
    for query, param in [("phase=sleeping", "phase"), ("limit=0", "limit"), ("limit=x", "limit")]:
        response, body = _json(client, "get", f"/api/instances/?{query}", operator_headers)
        assert response.status_code == 400 and body["error"]["param"] == param


def test_keys_are_shown_once_listed_without_secrets_and_revoked(client, operator_headers):
    response, body = _json(client, "post", "/api/keys/", operator_headers, {"name": "ci-evals"})
    assert response.status_code == 201 and body["key"].startswith("pt-") and body["role"] == "user"
    raw, key_id = body["key"], body["id"]
    assert client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 200
    response, listed = _json(client, "get", "/api/keys/", operator_headers)
    assert {k["name"] for k in listed} == {"ops", "ci-evals"} and all("key" not in k for k in listed)
    assert raw not in response.content.decode()
    response, body = _json(client, "post", f"/api/keys/{key_id}/revoke", operator_headers)
    assert body["is_active"] is False and not ApiKey.objects.get(pk=key_id).is_active
    response, body = _json(client, "post", "/api/keys/", operator_headers, {"name": "x", "role": "root"})
    assert response.status_code == 400 and body["error"]["param"] == "role"
    response, audit = _json(client, "get", "/api/audit/", operator_headers)
    assert [a["action"] for a in audit] == ["key.revoke", "key.create"]


def test_unknown_operator_paths_and_methods_answer_in_the_openai_shape(client, operator_headers):
    response, body = _json(client, "get", "/api/nothing-here", operator_headers)
    assert response.status_code == 404 and body["error"]["code"] == "not_found"
    response, body = _json(client, "put", "/api/nodes/", operator_headers, {})
    assert response.status_code == 405 and body["error"]["code"] == "method_not_allowed"
    response = client.post("/api/catalog/", data="{not json", content_type="application/json", **operator_headers)
    assert response.status_code == 400 and "error" in response.json()

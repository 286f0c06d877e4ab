"""GET /v1/models and /v1/models/{id}: exactly the enabled catalog, OpenAI-shaped."""
import pytest

from catalog.services import catalog_models_set_enabled

pytestmark = pytest.mark.django_db


def model_ids(client, auth_headers):
    response = client.get("/v1/models", **auth_headers)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    return [m["id"] for m in body["data"]]


def test_lists_exactly_the_enabled_models(client, auth_headers, catalog_model):
    from catalog.models import CatalogModel

    CatalogModel.objects.all().delete()
    on = catalog_model(model_id="alpha")
    off = catalog_model(model_id="beta", enabled=False)
    assert model_ids(client, auth_headers) == ["alpha"]

    catalog_models_set_enabled(ids=[off.pk], enabled=True)
    assert model_ids(client, auth_headers) == ["alpha", "beta"]

    catalog_models_set_enabled(ids=[on.pk], enabled=False)
    assert model_ids(client, auth_headers) == ["beta"]


def test_model_object_carries_openai_and_porten_fields(client, auth_headers, catalog_model):
    catalog_model(model_id="gamma", context_length=4096, vram_mb=2048, supports_tools=True, hf_repo="org/gamma")
    data = {m["id"]: m for m in client.get("/v1/models", **auth_headers).json()["data"]}
    gamma = data["gamma"]
    assert gamma["object"] == "model"
    assert isinstance(gamma["created"], int) and gamma["created"] > 1_600_000_000
    assert gamma["owned_by"] == "org"
    assert gamma["context_length"] == 4096
    assert gamma["capabilities"] == ["chat", "tools"]
    assert gamma["vram_mb"] == 2048
    assert gamma["ready"] is False


def test_detail_and_404_for_unknown_or_disabled(client, auth_headers, catalog_model):
    catalog_model(model_id="delta")
    catalog_model(model_id="hidden", enabled=False)
    response = client.get("/v1/models/delta", **auth_headers)
    assert response.status_code == 200
    assert response.json()["id"] == "delta"
    for model_id in ["hidden", "no-such-model"]:
        response = client.get(f"/v1/models/{model_id}", **auth_headers)
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "model_not_found"
        assert error["param"] == "model"
        assert model_id in error["message"]
        assert set(error) >= {"message", "type", "code", "param"}


def test_ready_reflects_a_ready_instance(client, auth_headers, catalog_model):
    from fleet.models import Instance, Node

    model = catalog_model(model_id="epsilon")
    node = Node.objects.create(name="n1")
    Instance.objects.create(model=model, node=node, phase="loading")
    assert client.get("/v1/models/epsilon", **auth_headers).json()["ready"] is False
    Instance.objects.filter(model=model).update(phase="ready")
    assert client.get("/v1/models/epsilon", **auth_headers).json()["ready"] is True

"""Operators curate the catalog in the admin: list, filter, search, bulk actions."""
import pytest
from django.contrib.auth.models import User

from catalog.models import CatalogModel

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    user = User.objects.create_superuser("op", "op@example.com", "pw")
    client.force_login(user)
    return client


def test_changelist_shows_readable_footprints_and_filters(admin_client, catalog_model):
    catalog_model(model_id="big-one", vram_mb=92000, engine="vllm", weight_format="safetensors", supports_tools=True)
    catalog_model(model_id="small-one", vram_mb=512)
    page = admin_client.get("/admin/catalog/catalogmodel/").content.decode()
    assert "92.0 GB" in page and "512 MB" in page  # MB and GB of 10^6 and 10^9 bytes
    tools_only = admin_client.get("/admin/catalog/catalogmodel/?capability=tools").content.decode()
    assert "big-one" in tools_only and "small-one" not in tools_only
    vllm_only = admin_client.get("/admin/catalog/catalogmodel/?engine__exact=vllm").content.decode()
    assert "big-one" in vllm_only and "small-one" not in vllm_only
    searched = admin_client.get("/admin/catalog/catalogmodel/?q=small").content.decode()
    assert "small-one" in searched and "big-one" not in searched


@pytest.mark.parametrize("action,field,before,after", [
    ("disable", "enabled", True, False),
    ("enable", "enabled", False, True),
    ("pin", "pinned", False, True),
    ("unpin", "pinned", True, False),
])
def test_bulk_actions(admin_client, catalog_model, action, field, before, after):
    rows = [catalog_model(model_id=f"m{i}", **{field: before}) for i in range(3)]
    untouched = catalog_model(model_id="other", **{field: before})
    response = admin_client.post("/admin/catalog/catalogmodel/", {
        "action": action, "_selected_action": [r.pk for r in rows],
    })
    assert response.status_code == 302
    assert all(getattr(CatalogModel.objects.get(pk=r.pk), field) is after for r in rows)
    assert getattr(CatalogModel.objects.get(pk=untouched.pk), field) is before


def test_admin_form_rejects_engine_format_mismatch(admin_client):
    response = admin_client.post("/admin/catalog/catalogmodel/add/", {
        "model_id": "bad", "display_name": "Bad", "hf_repo": "org/bad", "hf_revision": "main", "hf_files": "[]",
        "weight_format": "gguf", "engine": "vllm", "context_length": 512, "vram_mb": 100, "disk_mb": 10,
        "supports_chat": "on", "enabled": "on",
    })
    assert response.status_code == 200
    assert "cannot serve" in response.content.decode()
    assert not CatalogModel.objects.filter(model_id="bad").exists()


def test_admin_creates_api_key_and_shows_it_once(admin_client):
    from porten.keys import api_key_for

    response = admin_client.post("/admin/porten/apikey/add/", {"name": "notebook", "role": "user", "is_active": "on"},
                                 follow=True)
    messages = [str(m) for m in response.context["messages"]]
    raw_key = next(m.split(": ")[-1] for m in messages if "not shown again" in m)
    assert api_key_for(raw_key).name == "notebook"

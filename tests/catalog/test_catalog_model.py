"""CatalogModel validation and the starting catalog."""
import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from catalog.models import CatalogModel
from catalog.services import catalog_model_create, catalog_model_update

pytestmark = pytest.mark.django_db

VALID = dict(
    model_id="coder2.5-test-32b", display_name="Coder 2.5 test", hf_repo="Qwen/Qwen2.5-Coder-32B-Instruct-AWQ",
    weight_format="safetensors", engine="vllm", context_length=32768, vram_mb=29000, disk_mb=19500,
)


def test_valid_entry_is_created_with_dotted_slug_id():
    model = catalog_model_create(**VALID)
    assert CatalogModel.objects.get(model_id="coder2.5-test-32b") == model
    assert model.capabilities == ["chat"]
    assert model.source == "hf:Qwen/Qwen2.5-Coder-32B-Instruct-AWQ@main"


@pytest.mark.parametrize("bad_id", ["Qwen Coder", "UPPER", "-leading", "trailing-", "a/b", "", "naïve"])
def test_ids_must_be_slugs(bad_id):
    with pytest.raises(ValidationError) as exc:
        catalog_model_create(**{**VALID, "model_id": bad_id})
    assert "model_id" in exc.value.message_dict
    assert not CatalogModel.objects.filter(model_id=bad_id).exists()


@pytest.mark.parametrize("field", ["vram_mb", "disk_mb", "context_length"])
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_must_be_positive(field, value):
    with pytest.raises(ValidationError) as exc:
        catalog_model_create(**{**VALID, field: value})
    assert field in exc.value.message_dict


@pytest.mark.parametrize("fmt,engine", [("gguf", "vllm"), ("safetensors", "llamacpp")])
def test_engine_must_match_format(fmt, engine):
    with pytest.raises(ValidationError) as exc:
        catalog_model_create(**{**VALID, "weight_format": fmt, "engine": engine})
    assert "engine" in exc.value.message_dict
    assert "cannot serve" in exc.value.message_dict["engine"][0]


def test_a_source_is_required():
    with pytest.raises(ValidationError) as exc:
        catalog_model_create(**{**VALID, "hf_repo": "", "local_path": ""})
    assert "hf_repo" in exc.value.message_dict


def test_local_path_source_is_enough():
    model = catalog_model_create(**{**VALID, "hf_repo": "", "local_path": "/models/qwen"})
    assert model.source == "local:/models/qwen"


def test_database_constraints_hold_even_without_full_clean():
    with pytest.raises(IntegrityError), transaction.atomic():
        CatalogModel.objects.create(**{**VALID, "engine": "llamacpp"})
    with pytest.raises(IntegrityError), transaction.atomic():
        CatalogModel.objects.create(**{**VALID, "model_id": "other", "vram_mb": 0})


def test_duplicate_ids_are_refused():
    catalog_model_create(**VALID)
    with pytest.raises(ValidationError) as exc:
        catalog_model_create(**{**VALID, "display_name": "again"})
    assert "model_id" in exc.value.message_dict


def test_update_validates_too():
    model = catalog_model_create(**VALID)
    with pytest.raises(ValidationError):
        catalog_model_update(model=model, engine="llamacpp")
    model.refresh_from_db()
    assert model.engine == "vllm"


def test_starting_catalog_loads_real_sources_and_keeps_operator_edits():
    import importlib

    from django.apps import apps

    from catalog.starting_catalog import STARTING_CATALOG

    migration = importlib.import_module("catalog.migrations.0002_starting_catalog")
    CatalogModel.objects.all().delete()
    migration.load_starting_catalog(apps, None)
    ids = set(CatalogModel.objects.values_list("model_id", flat=True))
    assert {"qwen3-coder-next", "qwen2.5-coder-32b", "gemma-3-270m"} <= ids
    assert CatalogModel.objects.filter(enabled=False).exists(), "some entries are disabled to show curation"
    gemma = CatalogModel.objects.get(model_id="gemma-3-270m")
    assert (gemma.weight_format, gemma.engine, gemma.chat_format) == ("gguf", "llamacpp", "gemma")
    for model in CatalogModel.objects.all():
        model.full_clean()  # every entry passes the same validation operators face
    CatalogModel.objects.filter(model_id="gemma-3-270m").update(enabled=False)
    migration.load_starting_catalog(apps, None)
    assert CatalogModel.objects.count() == len(STARTING_CATALOG)
    assert CatalogModel.objects.get(model_id="gemma-3-270m").enabled is False

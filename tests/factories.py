"""factory_boy factories for Porten's models."""
import factory

from catalog.models import CatalogModel


class CatalogModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = CatalogModel
        django_get_or_create = ("model_id",)

    model_id = factory.Sequence(lambda n: f"test-model-{n}")
    display_name = factory.LazyAttribute(lambda o: o.model_id.replace("-", " ").title())
    hf_repo = factory.LazyAttribute(lambda o: f"porten-test/{o.model_id}")
    hf_revision = "main"
    hf_files = factory.LazyFunction(lambda: ["*.gguf"])
    weight_format = "gguf"
    engine = "llamacpp"
    chat_format = "gemma"
    context_length = 512
    vram_mb = 1024
    disk_mb = 242
    enabled = True

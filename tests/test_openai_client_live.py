"""The official openai client lists models from a live daphne hub."""
import openai
import pytest

from catalog.models import CatalogModel

pytestmark = pytest.mark.django_db(transaction=True)


def test_openai_models_list_against_live_server(live_hub, api_key, catalog_model):
    CatalogModel.objects.all().delete()
    catalog_model(model_id="gemma-3-270m")
    catalog_model(model_id="off-model", enabled=False)
    client = openai.OpenAI(base_url=live_hub.url + "/v1", api_key=api_key)
    assert [m.id for m in client.models.list()] == ["gemma-3-270m"]
    assert client.models.retrieve("gemma-3-270m").id == "gemma-3-270m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("off-model")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live_hub.url + "/v1", api_key="wrong").models.list()

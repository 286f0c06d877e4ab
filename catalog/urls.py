from django.urls import path

from .apis import ModelDetailApi, ModelListApi

urlpatterns = [
    path("v1/models", ModelListApi.as_view(), name="v1-models"),
    # Ids may contain dots and slashes are not allowed in them, so a plain segment is enough.
    path("v1/models/<str:model_id>", ModelDetailApi.as_view(), name="v1-model"),
]

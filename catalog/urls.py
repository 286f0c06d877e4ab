from django.urls import path

from .apis import CatalogApi, CatalogEntryActionApi, CatalogEntryApi, ModelDetailApi, ModelListApi

urlpatterns = [
    path("v1/models", ModelListApi.as_view(), name="v1-models"),
    # Ids may contain dots and slashes are not allowed in them, so a plain segment is enough.
    path("v1/models/<str:model_id>", ModelDetailApi.as_view(), name="v1-model"),
]

# Under /api/ (porten/urls.py).
api_urlpatterns = [
    path("catalog/", CatalogApi.as_view(), name="api-catalog"),
    path("catalog/<str:model_id>/", CatalogEntryApi.as_view(), name="api-catalog-entry"),
    path("catalog/<str:model_id>/<str:action>", CatalogEntryActionApi.as_view(), name="api-catalog-action"),
]

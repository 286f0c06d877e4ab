"""The operator API's URL map, under /api/: catalog, nodes, instances, keys, audit, and its schema."""
from django.http import JsonResponse
from django.urls import path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from catalog.urls import api_urlpatterns as catalog_api
from fleet.urls import api_urlpatterns as fleet_api

from .apis import ApiKeyApi, ApiKeyListApi, ApiKeyRevokeApi, AuditLogApi, UsageApi
from .errors import error_body


@csrf_exempt  # nothing here to protect: every method gets the same 404
def api_not_found(request, rest: str = "") -> JsonResponse:
    return JsonResponse(error_body(f"There is no operator API at /api/{rest}; see /api/docs/.",
                                   type="invalid_request_error", code="not_found"), status=404)


urlpatterns = [
    *catalog_api,
    *fleet_api,
    path("keys/", ApiKeyListApi.as_view(), name="api-keys"),
    path("keys/<int:key_id>/", ApiKeyApi.as_view(), name="api-key"),
    path("keys/<int:key_id>/revoke", ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
    path("audit/", AuditLogApi.as_view(), name="api-audit"),
    path("usage/", UsageApi.as_view(), name="api-usage"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    re_path(r"^(?P<rest>.*)$", api_not_found),
]

"""Porten's URL map."""
from django.contrib import admin
from django.urls import include, path

from fleet.urls import v1_fallback

from .health import healthz

admin.site.site_header = "Porten operations"
admin.site.site_title = "Porten"
admin.site.index_title = "Catalog and fleet"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("", include("catalog.urls")),
    path("", include("fleet.urls")),
    path("", include("playground.urls")),
    *v1_fallback,
]

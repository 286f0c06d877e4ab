"""Porten's URL map."""
from django.contrib import admin
from django.urls import include, path

from fleet.urls import v1_fallback

from . import pages
from .health import healthz
from .metrics import metrics

admin.site.site_header = "Porten operations"
admin.site.site_title = "Porten"
admin.site.index_title = "Catalog and fleet"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("api/", include("porten.api_urls")),
    # A person's own pages (any account; the admin has its own sign-in, for staff).
    path("accounts/login/", pages.sign_in, name="login"),
    path("accounts/logout/", pages.sign_out, name="logout"),
    path("keys/", pages.keys_page, name="keys"),
    path("keys/<int:key_id>/revoke", pages.key_revoke, name="key-revoke"),
    path("", include("catalog.urls")),
    path("", include("fleet.urls")),
    path("", include("playground.urls")),
    *v1_fallback,
]

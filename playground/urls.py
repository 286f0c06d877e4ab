"""The playground's pages; porten/urls.py includes them at the root."""
from django.urls import path
from django.views.generic import RedirectView

from . import views

urlpatterns = [
    path("", RedirectView.as_view(url="/playground/", permanent=False), name="home"),
    path("playground/", views.playground, name="playground"),
    path("playground/prewarm", views.prewarm, name="playground-prewarm"),
    path("fleet/", views.fleet_page, name="fleet-page"),
]

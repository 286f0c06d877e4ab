from django.urls import path, re_path

from .gateway import apis

# The token routes are served by fleet.gateway.asgi.GatewayApp ahead of Django (porten/asgi.py);
# they are here as well so that Django's test client and reverse() know them.
urlpatterns = [
    path("v1/chat/completions", apis.chat_completions, name="v1-chat-completions"),
    path("v1/completions", apis.completions, name="v1-completions"),
    path("v1/embeddings", apis.embeddings, name="v1-embeddings"),
    path("public/v1/models/warming", apis.warming, name="public-warming"),
]

# Last in the URL map (see porten/urls.py): anything else under /v1 gets an OpenAI-shaped 404.
v1_fallback = [re_path(r"^v1/(?P<rest>.*)$", apis.v1_not_found)]

from django.urls import path, re_path

from . import apis as operator_apis
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

# Under /api/ (porten/urls.py).
api_urlpatterns = [
    path("nodes/", operator_apis.NodeListApi.as_view(), name="api-nodes"),
    path("nodes/<str:name>/", operator_apis.NodeApi.as_view(), name="api-node"),
    path("nodes/<str:name>/drain", operator_apis.NodeDrainApi.as_view(), name="api-node-drain"),
    path("nodes/<str:name>/undrain", operator_apis.NodeUndrainApi.as_view(), name="api-node-undrain"),
    path("instances/", operator_apis.InstanceListApi.as_view(), name="api-instances"),
    path("instances/<int:instance_id>/", operator_apis.InstanceApi.as_view(), name="api-instance"),
    path("instances/<int:instance_id>/unload", operator_apis.InstanceUnloadApi.as_view(), name="api-instance-unload"),
]

"""ASGI entry point: the /v1 token routes (fleet.gateway), HTTP (Django) and websockets (Channels)."""
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "porten.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from fleet.gateway import apis  # noqa: E402
from fleet.gateway.asgi import GatewayApp  # noqa: E402
from playground.routing import websocket_urlpatterns  # noqa: E402

# One process serves the small static set itself; a production deployment may put a CDN in front.
http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.STATIC_URL else django_asgi_app

application = GatewayApp(
    ProtocolTypeRouter({
        "http": http_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }),
    routes={"/v1/chat/completions": apis.chat_completions, "/v1/completions": apis.completions,
            "/v1/embeddings": apis.embeddings},
)

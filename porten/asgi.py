"""ASGI entry point for daphne: HTTP (Django) and websockets (Channels)."""
import os
import sys

# Django hands sync work (signal receivers, the ORM) to threads; with the default 5 ms GIL switch
# interval each hand-off can wait that long behind the busy event loop. 0.5 ms keeps hops cheap.
sys.setswitchinterval(0.0005)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "porten.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from playground.routing import websocket_urlpatterns  # noqa: E402
from porten.gateway_handler import route_gateway  # noqa: E402

# One process serves the small static set itself; a production deployment may put a CDN in front.
http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.STATIC_URL else django_asgi_app

# The /v1 calls go straight to the lean handler, ahead of the protocol router (one frame less per call).
application = route_gateway(ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
))

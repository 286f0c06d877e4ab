"""Bearer API key authentication for /v1 (DRF views and async views alike)."""
from __future__ import annotations

from rest_framework import authentication, exceptions

from .keys import api_key_for, api_key_touch, bearer_token


class ApiKeyUser:
    """What request.user is for a caller that authenticated with an API key."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, api_key) -> None:
        self.api_key = api_key

    def __str__(self) -> str:
        return f"api-key:{self.api_key.name}"


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        token = bearer_token(request.META.get("HTTP_AUTHORIZATION", ""))
        if not token:
            return None
        api_key = api_key_for(token)
        if api_key is None:
            raise exceptions.AuthenticationFailed("invalid API key")
        api_key_touch(api_key)
        return ApiKeyUser(api_key), api_key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="porten"'


async def authenticate_async(request) -> tuple[object | None, bool]:
    """(caller, via_session) for an async view: a Bearer API key, or a signed-in Django session
    (the playground). Keys are checked first; a request with a bad key never falls back to a cookie."""
    from datetime import timedelta

    from django.utils import timezone

    from .keys import api_key_afor

    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header:
        api_key = await api_key_afor(bearer_token(header))
        if api_key is None:
            return None, False
        now = timezone.now()
        if api_key.last_used_at is None or now - api_key.last_used_at > timedelta(minutes=1):
            # Recorded at most once a minute: a write per request would cost the hot path.
            await type(api_key).objects.filter(pk=api_key.pk).aupdate(last_used_at=now)
        return ApiKeyUser(api_key), False
    user = await request.auser()
    if user.is_authenticated:
        return user, True
    return None, False

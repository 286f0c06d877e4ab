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

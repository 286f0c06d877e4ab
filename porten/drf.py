"""API-key authentication for DRF's views, through porten.auth's one key check."""
from __future__ import annotations

from asgiref.sync import async_to_sync
from rest_framework import authentication, exceptions

from .auth import api_key_user
from .keys import bearer_token


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """DRF's view of api_key_user."""

    def authenticate(self, request):
        token = bearer_token(request.META.get("HTTP_AUTHORIZATION", ""))
        if not token:
            return None
        user = async_to_sync(api_key_user)(token)
        if user is None:
            raise exceptions.AuthenticationFailed("invalid API key")
        return user, user.api_key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="porten"'

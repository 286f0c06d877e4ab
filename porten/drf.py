"""API-key authentication for DRF's views, through porten.auth's one key check."""
from __future__ import annotations

from asgiref.sync import async_to_sync
from rest_framework import authentication, exceptions

from .auth import api_key_user, bad_key_retry_after_sync
from .keys import bearer_token


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """DRF's view of api_key_user."""

    def authenticate(self, request):
        token = bearer_token(request.META.get("HTTP_AUTHORIZATION", ""))
        if not token:
            return None
        user = async_to_sync(api_key_user)(token)
        if user is None:
            if (wait_s := bad_key_retry_after_sync(request.META.get("REMOTE_ADDR", ""))) is not None:
                raise exceptions.Throttled(wait=wait_s, detail="Too many requests with an invalid API key from "
                                                               "this address; wait and retry with a valid key.")
            raise exceptions.AuthenticationFailed("invalid API key")
        return user, user.api_key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="porten"'


"""Bearer API key authentication for /v1 (DRF views and async views alike)."""
from __future__ import annotations

import time
from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions

from .keys import api_key_afor, api_key_for, api_key_touch, bearer_token, hash_key
from .refresh import look_up_once


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
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header:
        return await _api_key_user(bearer_token(header)), False
    user = await _session_user(request)
    if user is not None and user.is_authenticated:
        return user, True
    return None, False


async def _session_user(request):
    """The signed-in user, with or without the session and auth middleware in front of the view."""
    if hasattr(request, "auser"):
        return await request.auser()
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import aget_user

    session_key = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return None
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return await aget_user(request)


_KEY_TTL_S = 10.0  # a revoked key stops working within this long in every hub process
_TOUCH_EVERY = timedelta(minutes=1)
_key_cache: dict[str, tuple[float, ApiKeyUser]] = {}


async def _api_key_user(raw_key: str) -> ApiKeyUser | None:
    """The caller behind a key. Valid keys are remembered briefly so the hot path does not query
    the database per request; when one is looked up again, its last use is recorded if the
    recorded one is over a minute old (a write per request would cost the hot path)."""
    if not raw_key:
        return None
    now = time.monotonic()
    # Remembered by the key as sent, not by its stored hash: SHA-256 through OpenSSL cost about
    # 15 µs per call with the hub's caches cold between requests, a dict lookup well under one.
    # The process holds each key it is sent anyway, while it reads the request.
    hit = _key_cache.get(raw_key)
    if hit is not None and hit[0] > now:
        return hit[1]
    # Calls that come together with a key out of date (a burst after a quiet spell) share one
    # lookup, known by the key's stored hash: the key itself must not reach the log if it fails.
    return await look_up_once(("api-key", hash_key(raw_key)), _api_key_lookup, raw_key)


async def _api_key_lookup(raw_key: str) -> ApiKeyUser | None:
    now = time.monotonic()
    api_key = await api_key_afor(raw_key)
    if api_key is None:
        _key_cache.pop(raw_key, None)
        return None
    stamp = timezone.now()
    if api_key.last_used_at is None or stamp - api_key.last_used_at > _TOUCH_EVERY:
        await type(api_key).objects.filter(pk=api_key.pk).aupdate(last_used_at=stamp)
        api_key.last_used_at = stamp
    if len(_key_cache) > 10_000:
        _key_cache.clear()
    user = ApiKeyUser(api_key)
    _key_cache[raw_key] = (now + _KEY_TTL_S, user)
    return user


def csrf_failure(request, message: str = "CSRF check failed for a signed-in session; send the X-CSRFToken header."):
    """For views that take a session: an OpenAI-shaped 403 when the CSRF check fails, else None."""
    from django.middleware.csrf import CsrfViewMiddleware

    from .errors import error_response

    if CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is None:
        return None
    return error_response(403, message, type="invalid_request_error", code="csrf_failed")

"""Who is calling: a Bearer API key (scripts), or a signed-in Django session (the playground).
One path checks keys, for the async gateway and (through porten.drf) DRF's views alike."""
from __future__ import annotations

from datetime import timedelta
from importlib import import_module

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import aget_user, get_user_model
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone

from .cache import Cache
from .redis import aredis_client, redis_client
from .errors import error_response
from .keys import api_key_afor, bearer_token
from .scopes import Scope, key_scope, user_scope

KEY_TTL_S = 10.0  # a revoked key stops working within this long in every hub process
KEY_REFRESH_S = 2.0  # a key in use is looked up again in the background this long before KEY_TTL_S
TOUCH_EVERY = timedelta(minutes=1)  # last use is recorded at most this often (not per request)


class ApiKeyUser:
    """What request.user is for a caller that authenticated with an API key."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, api_key, scope) -> None:
        self.api_key, self.scope = api_key, scope

    def __str__(self) -> str:
        return f"api-key:{self.api_key.name}"


async def _key_lookup(raw_key: str) -> ApiKeyUser | None:
    api_key = await api_key_afor(raw_key)
    if api_key is None:
        return None
    stamp = timezone.now()
    if api_key.last_used_at is None or stamp - api_key.last_used_at > TOUCH_EVERY:
        await type(api_key).objects.filter(pk=api_key.pk).aupdate(last_used_at=stamp)
        api_key.last_used_at = stamp
    return ApiKeyUser(api_key, await sync_to_async(key_scope, thread_sensitive=False)(api_key))


# Kept by the key as sent: a dict lookup, where hashing it costs more per request. A bad key is
# looked up again each time, never answered from the cache. A key in use is looked up again while
# its answer still serves (a busy key's requests never all wait on one lookup, and so never leave
# together, in step), and no answer is older than KEY_TTL_S.
_keys: Cache[str, ApiKeyUser] = Cache("api-key", _key_lookup, ttl_s=KEY_TTL_S - KEY_REFRESH_S,
                                      stale_for_s=KEY_REFRESH_S, keep_negative=False)


async def api_key_user(raw_key: str) -> ApiKeyUser | None:
    """The caller behind an API key, or None for a missing, unknown, revoked or expired one."""
    if not raw_key:
        return None
    user = await _keys.get(raw_key)
    if user is not None and user.api_key.expires_at is not None and user.api_key.expires_at <= timezone.now():
        return None
    return user


async def _user_scope_lookup(user_id: int) -> Scope | None:
    user = await get_user_model().objects.filter(pk=user_id).afirst()
    return None if user is None else await sync_to_async(user_scope, thread_sensitive=False)(user)


_user_scopes: Cache[int, Scope] = Cache("user-scope", _user_scope_lookup, ttl_s=KEY_TTL_S)


async def caller_scope(caller) -> Scope:
    """What the caller (from authenticate_async) may use: a key's scope, a person's policy; staff
    have no bound."""
    if isinstance(caller, ApiKeyUser):
        return caller.scope
    if getattr(caller, "is_staff", False):
        return Scope(bucket=f"user:{caller.pk}", user_id=caller.pk)
    return await _user_scopes.get(caller.pk) or Scope(bucket=f"user:{caller.pk}", user_id=caller.pk, models=frozenset())


async def authenticate_async(request) -> tuple[object | None, bool]:
    """(caller, via_session) for an async view: a Bearer API key, or a signed-in Django session
    (the playground). Keys are checked first; a request with a bad key never falls back to a cookie."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header:
        return await api_key_user(bearer_token(header)), False
    user = await session_user(request)
    if user is not None and user.is_authenticated:
        return user, True
    return None, False


async def session_user(request):
    """The signed-in user, with or without the session and auth middleware in front of the view."""
    if hasattr(request, "auser"):
        return await request.auser()
    session_key = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return None
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return await aget_user(request)


def csrf_failure(request, message: str = "CSRF check failed for a signed-in session; send the X-CSRFToken header."):
    """For views that take a session: an OpenAI-shaped 403 when the CSRF check fails, else None."""
    if CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is None:
        return None
    return error_response(403, message, type="invalid_request_error", code="csrf_failed")


BAD_KEY_WINDOW_S = 60


def _bad_key_counter(address: str) -> str:
    return f"porten:bad-keys:{address}"


async def bad_key_retry_after(address: str) -> int | None:
    """Count a bad key sent from `address`; past PORTEN_BAD_KEYS_PER_MINUTE, the seconds it must
    wait (the caller answers 429), else None. Redis unavailable: not counted."""
    try:
        pipe = aredis_client().pipeline(transaction=False)
        pipe.incr(_bad_key_counter(address))
        pipe.expire(_bad_key_counter(address), BAD_KEY_WINDOW_S, nx=True)
        pipe.ttl(_bad_key_counter(address))
        count, _, ttl = await pipe.execute()
    except Exception:
        return None
    return max(int(ttl), 1) if count > settings.PORTEN_BAD_KEYS_PER_MINUTE else None


def bad_key_retry_after_sync(address: str) -> int | None:
    try:
        pipe = redis_client().pipeline(transaction=False)
        pipe.incr(_bad_key_counter(address))
        pipe.expire(_bad_key_counter(address), BAD_KEY_WINDOW_S, nx=True)
        pipe.ttl(_bad_key_counter(address))
        count, _, ttl = pipe.execute()
    except Exception:
        return None
    return max(int(ttl), 1) if count > settings.PORTEN_BAD_KEYS_PER_MINUTE else None


def too_many_bad_keys(retry_after_s: int):
    return error_response(429, "Too many requests with an invalid API key from this address; wait and retry "
                               "with a valid key.", type="invalid_request_error", code="rate_limit_exceeded",
                          headers={"Retry-After": str(retry_after_s)})

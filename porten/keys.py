"""Creating and checking API keys."""
from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from .models import ApiKey, KeyRole
from .scopes import policy_for

KEY_PREFIX = "pt-"


def hash_key(raw_key: str) -> str:
    # Keys are long random tokens, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(raw_key.encode()).hexdigest()


@transaction.atomic
def api_key_create(*, name: str, role: str = KeyRole.USER, user=None, allowed_models: list[str] | None = None,
                   expires_at: datetime | None = None, rpm_limit: int | None = None, tpm_limit: int | None = None,
                   max_concurrent: int | None = None) -> tuple[ApiKey, str]:
    """Create a key; the raw key is returned once and never stored."""
    name = name.strip()
    if not name:
        raise ValueError("an API key needs a name")
    if role not in KeyRole.values:
        raise ValueError(f"role is one of {', '.join(KeyRole.values)}")
    if expires_at is not None and expires_at <= timezone.now():
        raise ValueError("the expiry must be in the future")
    for limit in (rpm_limit, tpm_limit, max_concurrent):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError("limits are whole numbers of at least 1 (or none)")
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    api_key = ApiKey.objects.create(
        name=name, prefix=raw_key[:10], key_hash=hash_key(raw_key), role=role, user=user,
        allowed_models=sorted(set(allowed_models or [])), expires_at=expires_at, rpm_limit=rpm_limit,
        tpm_limit=tpm_limit, max_concurrent=max_concurrent)
    return api_key, raw_key


@transaction.atomic
def api_key_update(*, api_key: ApiKey, **fields) -> ApiKey:
    """Change a key's name, role or scope; every hub process sees it within porten.auth.KEY_TTL_S."""
    for name, value in fields.items():
        setattr(api_key, name, sorted(set(value)) if name == "allowed_models" else value)
    api_key.full_clean(exclude=["key_hash"])
    api_key.save()
    return api_key


LIMIT_NAMES = {"rpm_limit": "requests per minute", "tpm_limit": "tokens per minute",
               "max_concurrent": "concurrent requests"}


class OutsidePolicy(ValueError):
    pass


@transaction.atomic
def api_key_create_own(*, user, name: str, allowed_models: list[str] | None = None,
                       expires_at: datetime | None = None, rpm_limit: int | None = None,
                       tpm_limit: int | None = None, max_concurrent: int | None = None) -> tuple[ApiKey, str]:
    """A person makes a key of their own: a user key, within the models and limits their policy
    allows (a limit left empty takes the policy's)."""
    policy = policy_for(user)
    live = ApiKey.objects.filter(user=user, is_active=True).exclude(expires_at__lte=timezone.now())
    if live.count() >= policy.max_keys:
        raise OutsidePolicy(f"you have {policy.max_keys} active keys, the most you may; revoke one first")
    allowed = set(policy.allowed_models)
    if allowed and allowed_models and not set(allowed_models) <= allowed:
        raise OutsidePolicy(f"you may use only {', '.join(sorted(allowed))}")
    limits = {}
    for name_, asked, most in [("rpm_limit", rpm_limit, policy.rpm_limit), ("tpm_limit", tpm_limit, policy.tpm_limit),
                               ("max_concurrent", max_concurrent, policy.max_concurrent)]:
        if most is not None and asked is not None and asked > most:
            raise OutsidePolicy(f"{LIMIT_NAMES[name_]} is at most {most} for you")
        limits[name_] = asked if asked is not None else most
    return api_key_create(name=name, user=user, allowed_models=allowed_models or sorted(allowed),
                          expires_at=expires_at, **limits)


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke a key; every hub process stops accepting it within porten.auth.KEY_TTL_S."""
    ApiKey.objects.filter(pk=api_key.pk).update(is_active=False)
    api_key.is_active = False
    return api_key


def api_key_for(raw_key: str) -> ApiKey | None:
    if not raw_key:
        return None
    return ApiKey.objects.filter(key_hash=hash_key(raw_key), is_active=True).first()


async def api_key_afor(raw_key: str) -> ApiKey | None:
    if not raw_key:
        return None
    return await ApiKey.objects.filter(key_hash=hash_key(raw_key), is_active=True).afirst()


def bearer_token(authorization_header: str) -> str:
    scheme, _, token = (authorization_header or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""

"""Creating and checking API keys."""
from __future__ import annotations

import hashlib
import secrets

from django.db import transaction

from .models import ApiKey

KEY_PREFIX = "pt-"


def hash_key(raw_key: str) -> str:
    # Keys are long random tokens, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(raw_key.encode()).hexdigest()


@transaction.atomic
def api_key_create(*, name: str) -> tuple[ApiKey, str]:
    """Create a key; the raw key is returned once and never stored."""
    name = name.strip()
    if not name:
        raise ValueError("an API key needs a name")
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    api_key = ApiKey.objects.create(name=name, prefix=raw_key[:10], key_hash=hash_key(raw_key))
    return api_key, raw_key


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

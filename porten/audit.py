"""The operators' audit log: every write through the operator API or an admin action."""
from __future__ import annotations

from typing import Any

from .models import AuditEntry


def actor_of(user) -> str:
    """Who made a request: a staff user by username, an API key by name and prefix."""
    api_key = getattr(user, "api_key", None)
    if api_key is not None:
        return f"key:{api_key.name} ({api_key.prefix}…)"
    return f"user:{getattr(user, 'username', '') or user}"


def audit_record(*, user, action: str, target: str = "", detail: dict[str, Any] | None = None) -> AuditEntry:
    return AuditEntry.objects.create(actor=actor_of(user)[:200], action=action, target=str(target)[:200],
                                     detail=detail or {})

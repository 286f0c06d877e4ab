"""What a caller may use: the models and the limits of an API key, bounded by its owner's access
policy, or a signed-in person's own policy. Staff sessions and keys without an owner or limits
have no bound."""
from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import Group

from .models import AccessPolicy, ApiKey


@dataclass(frozen=True)
class Scope:
    """`models` None: every offered model. A limit None: no limit. `bucket` names the caller's
    counters in Redis (one per key, or per person for their sessions)."""

    bucket: str
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None
    api_key_id: int | None = None
    user_id: int | None = None

    def allows(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.concurrent is not None


UNBOUNDED = AccessPolicy()  # never saved: the policy of a person no operator has bound


def _tighter(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _models(*lists: list[str]) -> frozenset[str] | None:
    """The models every non-empty list allows (an empty list allows all)."""
    sets = [frozenset(names) for names in lists if names]
    if not sets:
        return None
    return frozenset.intersection(*sets)


def policy_for(user) -> AccessPolicy:
    """A person's own policy, else the most generous of their groups' (union of models, the
    highest of each limit), else no bound."""
    if user is None or getattr(user, "is_staff", False):
        return UNBOUNDED
    own = AccessPolicy.objects.filter(user=user).first()
    if own is not None:
        return own
    groups = list(AccessPolicy.objects.filter(group__in=Group.objects.filter(user=user)))
    if not groups:
        return UNBOUNDED
    merged = AccessPolicy(
        allowed_models=[] if any(not p.allowed_models for p in groups)
        else sorted({m for p in groups for m in p.allowed_models}),
        max_keys=max(p.max_keys for p in groups))
    for limit in ("rpm_limit", "tpm_limit", "max_concurrent"):
        values = [getattr(p, limit) for p in groups]
        setattr(merged, limit, None if None in values else max(values))
    return merged


def key_scope(api_key: ApiKey, owner_policy: AccessPolicy | None = None) -> Scope:
    """A key's scope: its own models and limits, within its owner's policy."""
    policy = owner_policy if owner_policy is not None else (
        policy_for(api_key.user) if api_key.user_id else UNBOUNDED)
    return Scope(
        bucket=f"key:{api_key.pk}", api_key_id=api_key.pk, user_id=api_key.user_id,
        models=_models(api_key.allowed_models, policy.allowed_models),
        rpm=_tighter(api_key.rpm_limit, policy.rpm_limit), tpm=_tighter(api_key.tpm_limit, policy.tpm_limit),
        concurrent=_tighter(api_key.max_concurrent, policy.max_concurrent))


def user_scope(user) -> Scope:
    policy = policy_for(user)
    return Scope(bucket=f"user:{user.pk}", user_id=user.pk, models=_models(policy.allowed_models),
                 rpm=policy.rpm_limit, tpm=policy.tpm_limit, concurrent=policy.max_concurrent)

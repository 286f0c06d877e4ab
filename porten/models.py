"""API keys (only a hash of each is stored) with their scope and limits, the scopes operators set
for people and groups, usage per key, model and hour, and the operators' audit log."""
from __future__ import annotations

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q


class KeyRole(models.TextChoices):
    USER = "user", "user (/v1 only)"
    OPERATOR = "operator", "operator (/v1 and the operator API)"


class Limits(models.Model):
    """Per-minute request and token limits and a cap on concurrent requests: a key's own, or the
    most an access policy lets its person's keys have."""

    rpm_limit = models.PositiveIntegerField("requests per minute", null=True, blank=True,
                                            validators=[MinValueValidator(1)], help_text="Empty: no limit.")
    tpm_limit = models.PositiveIntegerField("tokens per minute", null=True, blank=True,
                                            validators=[MinValueValidator(1)], help_text="Empty: no limit.")
    max_concurrent = models.PositiveIntegerField("concurrent requests", null=True, blank=True,
                                                 validators=[MinValueValidator(1)], help_text="Empty: no limit.")

    class Meta:
        abstract = True


class ApiKey(Limits):
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="The first characters of the key, to tell keys apart.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    is_active = models.BooleanField(default=True)
    role = models.CharField(max_length=20, choices=KeyRole.choices, default=KeyRole.USER,
                            help_text="Operators may also manage the catalog and the fleet through /api/.")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="api_keys", help_text="Whose key it is; their access policy bounds it.")
    allowed_models = models.JSONField(
        default=list, blank=True, help_text='Catalog ids this key may use, e.g. ["qwen3-8b"]; empty: every offered model.')
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Refused (401) from then on; empty: never.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class AuditEntry(models.Model):
    """One write an operator made through the operator API or the admin: who, what, when."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.CharField(max_length=200, help_text="A staff user, or an operator API key.")
    action = models.CharField(max_length=100, help_text="e.g. catalog.update, node.drain, instance.load")
    target = models.CharField(max_length=200, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit log"

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.target}"


class AccessPolicy(Limits):
    """What a person (or everyone in a group) may use: the models, and the most their keys may have.
    A person's own policy wins over their groups'; without either, every offered model, no limit."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                                related_name="access_policy")
    group = models.OneToOneField("auth.Group", null=True, blank=True, on_delete=models.CASCADE,
                                 related_name="access_policy")
    allowed_models = models.JSONField(default=list, blank=True,
                                      help_text="Catalog ids; empty: every offered model.")
    max_keys = models.PositiveIntegerField(default=10, help_text="Keys a person may make for themselves.")

    class Meta:
        verbose_name = "access policy"
        verbose_name_plural = "access policies"
        constraints = [models.CheckConstraint(
            condition=(Q(user__isnull=False) & Q(group__isnull=True)) | (Q(user__isnull=True) & Q(group__isnull=False)),
            name="policy_for_a_user_or_a_group")]

    def __str__(self) -> str:
        return f"policy for {self.user or self.group}"


class UsageRecord(models.Model):
    """Tokens used through one key (or one signed-in person) on one model in one hour."""

    hour = models.DateTimeField(db_index=True)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="usage")
    model_id = models.CharField(max_length=100)
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-hour", "model_id"]
        constraints = [models.UniqueConstraint(fields=["hour", "api_key", "user", "model_id"],
                                               name="usage_one_row_per_hour_key_user_model",
                                               nulls_distinct=False)]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 {self.api_key or self.user} {self.model_id}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

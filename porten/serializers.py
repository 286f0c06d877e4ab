"""API keys and the audit log as the operator API shows them."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from rest_framework import serializers

from .models import ApiKey, AuditEntry, KeyRole


SCOPE_FIELDS = ["allowed_models", "expires_at", "rpm_limit", "tpm_limit", "max_concurrent"]


class ApiKeySerializer(serializers.ModelSerializer):
    user = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "role", "user", "is_active", *SCOPE_FIELDS, "created_at", "last_used_at"]
        read_only_fields = fields


class ApiKeyScopeSerializer(serializers.ModelSerializer):
    """What an operator may change on a key: its name, role and scope."""

    allowed_models = serializers.ListField(child=serializers.CharField(max_length=100), required=False,
                                           help_text="Catalog ids; empty: every offered model.")

    class Meta:
        model = ApiKey
        fields = ["name", "role", *SCOPE_FIELDS]


class ApiKeyCreateSerializer(ApiKeyScopeSerializer):
    name = serializers.CharField(max_length=100, help_text="What the key is for, e.g. 'ci-evals'.")
    role = serializers.ChoiceField(choices=KeyRole.choices, default=KeyRole.USER)
    user = serializers.SlugRelatedField(slug_field="username", queryset=get_user_model().objects.all(),
                                        required=False, allow_null=True, help_text="Whose key it is (username).")

    class Meta(ApiKeyScopeSerializer.Meta):
        fields = ["name", "role", "user", *SCOPE_FIELDS]


class NewApiKeySerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The key itself: shown this once, never again.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class AuditEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEntry
        fields = ["id", "at", "actor", "action", "target", "detail"]
        read_only_fields = fields

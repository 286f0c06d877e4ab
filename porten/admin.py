"""Admin for API keys (creating one shows the raw key once), people's access policies, usage, the audit log."""
from django import forms
from django.contrib import admin, messages
from django.utils import timezone

from .audit import audit_record
from .keys import api_key_create
from .models import AccessPolicy, ApiKey, AuditEntry, UsageRecord


class RecordAdmin(admin.ModelAdmin):
    """Records something else stands behind (an agent, an engine, the request path): shown, never
    added, changed or deleted by hand; actions change them through services."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


def model_id_list(value) -> list[str]:
    """A JSON list of catalog ids, as the admin's JSON field gives it; else a ValidationError."""
    if value in (None, ""):
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise forms.ValidationError('A JSON list of catalog ids, e.g. ["qwen3-8b"]; [] for every offered model.')
    return value


class ApiKeyAdminForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = "__all__"

    def clean_allowed_models(self):
        return model_id_list(self.cleaned_data.get("allowed_models"))

    def clean_expires_at(self):
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and self.instance.pk is None and expires_at <= timezone.now():
            raise forms.ValidationError("A new key's expiry must be in the future.")
        return expires_at


class AccessPolicyAdminForm(forms.ModelForm):
    class Meta:
        model = AccessPolicy
        fields = "__all__"

    def clean_allowed_models(self):
        return model_id_list(self.cleaned_data.get("allowed_models"))


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyAdminForm
    list_display = ["name", "prefix", "user", "role", "is_active", "expires_at", "created_at", "last_used_at"]
    list_filter = ["is_active", "role"]
    search_fields = ["name", "prefix", "user__username"]
    list_select_related = ["user"]
    autocomplete_fields = ["user"]
    fields = ["name", "role", "is_active", "user", "allowed_models", "expires_at", "rpm_limit", "tpm_limit",
              "max_concurrent", "prefix", "created_at", "last_used_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at"]
    actions = ["revoke"]

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        created, raw_key = api_key_create(
            name=obj.name, role=obj.role, user=obj.user, allowed_models=obj.allowed_models, expires_at=obj.expires_at,
            rpm_limit=obj.rpm_limit, tpm_limit=obj.tpm_limit, max_concurrent=obj.max_concurrent)
        audit_record(user=request.user, action="key.create", target=str(created), detail={"role": created.role,
                                                                                            "via": "admin"})
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = created.pk, created.prefix, created.key_hash, created.created_at
        if not obj.is_active:
            ApiKey.objects.filter(pk=created.pk).update(is_active=False)
        messages.warning(request, f"Copy this key now; it is not shown again: {raw_key}")

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        count = queryset.update(is_active=False)
        for api_key in queryset:
            audit_record(user=request.user, action="key.revoke", target=str(api_key), detail={"via": "admin"})
        self.message_user(request, f"Revoked {count} key(s).")


@admin.register(AuditEntry)
class AuditEntryAdmin(RecordAdmin):
    list_display = ["at", "actor", "action", "target"]
    list_filter = ["action"]
    search_fields = ["actor", "action", "target"]
    readonly_fields = ["at", "actor", "action", "target", "detail"]


@admin.register(AccessPolicy)
class AccessPolicyAdmin(admin.ModelAdmin):
    """Per person or per group: the models they may use and the most their own keys may have."""

    form = AccessPolicyAdminForm
    list_display = ["__str__", "user", "group", "allowed_models", "rpm_limit", "tpm_limit", "max_concurrent",
                    "max_keys"]
    list_select_related = ["user", "group"]
    search_fields = ["user__username", "group__name"]
    autocomplete_fields = ["user", "group"]
    fields = ["user", "group", "allowed_models", "rpm_limit", "tpm_limit", "max_concurrent", "max_keys"]


@admin.register(UsageRecord)
class UsageRecordAdmin(RecordAdmin):
    """Read only: the hub writes these (porten.usage.usage_persist)."""

    list_display = ["hour", "api_key", "user", "model_id", "requests", "prompt_tokens", "completion_tokens",
                    "total_tokens"]
    list_filter = ["hour", "model_id", "user", "api_key"]
    list_select_related = ["api_key", "user"]
    search_fields = ["model_id", "user__username", "api_key__name", "api_key__prefix"]
    date_hierarchy = "hour"

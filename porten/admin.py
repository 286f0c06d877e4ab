"""Admin for API keys: creating one shows the raw key once."""
from django.contrib import admin, messages

from .keys import api_key_create
from .models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "is_active", "created_at", "last_used_at"]
    list_filter = ["is_active"]
    search_fields = ["name", "prefix"]
    fields = ["name", "is_active", "prefix", "created_at", "last_used_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at"]
    actions = ["revoke"]

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        created, raw_key = api_key_create(name=obj.name)
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = created.pk, created.prefix, created.key_hash, created.created_at
        if not obj.is_active:
            ApiKey.objects.filter(pk=created.pk).update(is_active=False)
        messages.warning(request, f"Copy this key now; it is not shown again: {raw_key}")

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        count = queryset.update(is_active=False)
        self.message_user(request, f"Revoked {count} key(s).")

"""Operators curate the catalog here."""
from __future__ import annotations

from django.contrib import admin
from django.db.models import Q

from .models import CatalogModel
from .services import catalog_models_set_enabled, catalog_models_set_pinned


def readable_mb(mb: int | None) -> str:
    if not mb:
        return "—"
    return f"{mb / 1024:,.1f} GB" if mb >= 1024 else f"{mb:,} MB"


class CapabilityFilter(admin.SimpleListFilter):
    title = "capability"
    parameter_name = "capability"

    def lookups(self, request, model_admin):
        return [("chat", "chat"), ("tools", "tools"), ("json", "JSON mode"), ("vision", "vision")]

    def queryset(self, request, queryset):
        if self.value() in {"chat", "tools", "json", "vision"}:
            return queryset.filter(Q(**{f"supports_{self.value()}": True}))
        return queryset


@admin.register(CatalogModel)
class CatalogModelAdmin(admin.ModelAdmin):
    list_display = [
        "model_id", "display_name", "engine", "weight_format", "vram", "disk", "context_length",
        "capability_list", "pinned", "enabled",
    ]
    list_filter = ["enabled", "pinned", "engine", "weight_format", CapabilityFilter]
    search_fields = ["model_id", "display_name", "hf_repo", "description"]
    list_per_page = 100
    actions = ["enable", "disable", "pin", "unpin"]
    readonly_fields = ["created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["model_id", "display_name", "description", "enabled", "pinned"]}),
        ("Source", {"fields": ["hf_repo", "hf_revision", "hf_files", "local_path"]}),
        ("Serving", {"fields": ["weight_format", "engine", "chat_format", "context_length", "vram_mb", "disk_mb"]}),
        ("Capabilities", {"fields": ["supports_chat", "supports_tools", "supports_json", "supports_vision",
                                         "supports_embeddings"]}),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    @admin.display(description="VRAM", ordering="vram_mb")
    def vram(self, obj: CatalogModel) -> str:
        return readable_mb(obj.vram_mb)

    @admin.display(description="on disk", ordering="disk_mb")
    def disk(self, obj: CatalogModel) -> str:
        return readable_mb(obj.disk_mb)

    @admin.display(description="capabilities")
    def capability_list(self, obj: CatalogModel) -> str:
        return ", ".join(obj.capabilities) or "—"

    @admin.action(description="Enable (offer) selected models")
    def enable(self, request, queryset):
        count = catalog_models_set_enabled(ids=queryset.values_list("pk", flat=True), enabled=True)
        self.message_user(request, f"Enabled {count} model(s).")

    @admin.action(description="Disable (stop offering) selected models")
    def disable(self, request, queryset):
        count = catalog_models_set_enabled(ids=queryset.values_list("pk", flat=True), enabled=False)
        self.message_user(request, f"Disabled {count} model(s).")

    @admin.action(description="Pin selected models (never evicted)")
    def pin(self, request, queryset):
        count = catalog_models_set_pinned(ids=queryset.values_list("pk", flat=True), pinned=True)
        self.message_user(request, f"Pinned {count} model(s).")

    @admin.action(description="Unpin selected models")
    def unpin(self, request, queryset):
        count = catalog_models_set_pinned(ids=queryset.values_list("pk", flat=True), pinned=False)
        self.message_user(request, f"Unpinned {count} model(s).")

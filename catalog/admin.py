"""Operators curate the catalog here."""
from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Q

from fleet.placement import PlacementError, instance_load_now
from porten.audit import audit_record
from porten.units import readable_mb

from .models import CatalogModel
from .services import catalog_models_set_enabled, catalog_models_set_pinned


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
    actions = ["load_now", "enable", "disable", "pin", "unpin"]
    readonly_fields = ["created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["model_id", "display_name", "description", "enabled", "pinned"]}),
        ("Source", {"fields": ["hf_repo", "hf_revision", "hf_files", "local_path"]}),
        ("Serving", {"fields": ["weight_format", "engine", "chat_format", "context_length", "vram_mb", "disk_mb",
                                "engine_args", "aliases", "idle_ttl_s"]}),
        ("Replicas", {"fields": ["min_replicas", "max_replicas", "target_inflight"]}),
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

    @admin.action(description="Load selected models now (where the planner chooses)")
    def load_now(self, request, queryset):
        for model in queryset.filter(enabled=True):
            try:
                instance = instance_load_now(model=model)
            except PlacementError as exc:
                self.message_user(request, f"{model.model_id}: {exc.reason}", messages.ERROR)
                continue
            audit_record(user=request.user, action="instance.load", target=model.model_id,
                         detail={"node": instance.node.name, "instance": instance.pk, "via": "admin"})
            self.message_user(request, f"{model.model_id}: {instance.phase} on {instance.node.name}.")

    def _set(self, request, queryset, action: str, change, done: str) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        count = change(ids)
        for model_id in queryset.values_list("model_id", flat=True):
            audit_record(user=request.user, action=f"catalog.{action}", target=model_id, detail={"via": "admin"})
        self.message_user(request, f"{done} {count} model(s).")

    @admin.action(description="Enable (offer) selected models")
    def enable(self, request, queryset):
        self._set(request, queryset, "enable", lambda ids: catalog_models_set_enabled(ids=ids, enabled=True), "Enabled")

    @admin.action(description="Disable (stop offering) selected models")
    def disable(self, request, queryset):
        self._set(request, queryset, "disable", lambda ids: catalog_models_set_enabled(ids=ids, enabled=False),
                  "Disabled")

    @admin.action(description="Pin selected models (never evicted)")
    def pin(self, request, queryset):
        self._set(request, queryset, "pin", lambda ids: catalog_models_set_pinned(ids=ids, pinned=True), "Pinned")

    @admin.action(description="Unpin selected models")
    def unpin(self, request, queryset):
        self._set(request, queryset, "unpin", lambda ids: catalog_models_set_pinned(ids=ids, pinned=False), "Unpinned")

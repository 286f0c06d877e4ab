"""Operators watch the fleet here: nodes with their memory, instances with their phase and progress."""
from django.contrib import admin
from django.utils.html import format_html

from catalog.admin import readable_mb

from .models import Instance, Node
from .dispatch import instance_enqueue_unload
from .services import node_set_draining


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ["name", "address", "hostname", "draining", "has_gpu", "devices", "memory", "disk_free", "running",
                    "last_heartbeat_at"]
    readonly_fields = [f.name for f in Node._meta.fields]
    search_fields = ["name", "hostname"]
    actions = ["drain", "undrain"]

    @admin.action(description="Drain selected nodes (no new placements; their models move when requested)")
    def drain(self, request, queryset):
        for node in queryset:
            node_set_draining(name=node.name, draining=True)
        self.message_user(request, f"Draining {queryset.count()} node(s).")

    @admin.action(description="Undrain selected nodes (take placements again)")
    def undrain(self, request, queryset):
        for node in queryset:
            node_set_draining(name=node.name, draining=False)
        self.message_user(request, f"{queryset.count()} node(s) take placements again.")

    @admin.display(description="devices")
    def devices(self, node: Node) -> str:
        return ", ".join(f"{g.get('index')}: {g.get('name')}" for g in node.gpus) or "—"

    @admin.display(description="memory free / total")
    def memory(self, node: Node) -> str:
        return f"{readable_mb(node.memory_free_mb)} / {readable_mb(node.memory_total_mb)}"

    @admin.display(description="engines")
    def running(self, node: Node) -> int:
        return len(node.engines or [])

    @admin.display(description="disk free")
    def disk_free(self, node: Node) -> str:
        return readable_mb(node.disk_free_mb)


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = ["model", "node", "phase", "progress", "port", "pid", "load_seconds", "ready_at", "short_error",
                    "placement_reason"]
    list_filter = ["phase", "node"]
    search_fields = ["model__model_id", "node__name", "last_error"]
    readonly_fields = [f.name for f in Instance._meta.fields]
    actions = ["unload"]

    @admin.display(description="download")
    def progress(self, instance: Instance) -> str:
        if not instance.bytes_total:
            return "—"
        pct = 100 * instance.bytes_done / instance.bytes_total
        return format_html("{} of {} ({}%)", readable_mb(instance.bytes_done // 1_048_576),
                           readable_mb(instance.bytes_total // 1_048_576), f"{pct:.1f}")

    @admin.display(description="error")
    def short_error(self, instance: Instance) -> str:
        return (instance.last_error.splitlines() or [""])[0][:120]

    @admin.action(description="Unload selected instances (weights stay on disk)")
    def unload(self, request, queryset):
        for instance in queryset.select_related("node"):
            instance_enqueue_unload(instance)
        self.message_user(request, f"Asked {queryset.count()} instance(s) to unload.")

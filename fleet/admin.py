"""Operators watch the fleet here: nodes with their memory, instances with their phase and progress.
Both are the fleet's own records (agents and engines stand behind them): read-only, changed through
actions that call the same services as the operator API."""
from django.contrib import admin
from django.utils.html import format_html

from porten.admin import RecordAdmin
from porten.audit import audit_record
from porten.units import mb_from_bytes, readable_mb

from .models import Instance, Node
from .placement import instance_unload
from .services import node_set_draining


@admin.register(Node)
class NodeAdmin(RecordAdmin):
    list_display = ["name", "address", "hostname", "draining", "has_gpu", "devices", "memory", "disk_free", "running",
                    "last_heartbeat_at"]
    readonly_fields = [f.name for f in Node._meta.fields]
    search_fields = ["name", "hostname"]
    actions = ["drain", "undrain"]

    @admin.action(description="Drain selected nodes (no new placements; their models move when requested)")
    def drain(self, request, queryset):
        for node in queryset:
            node_set_draining(name=node.name, draining=True)
            audit_record(user=request.user, action="node.drain", target=node.name, detail={"via": "admin"})
        self.message_user(request, f"Draining {queryset.count()} node(s).")

    @admin.action(description="Undrain selected nodes (take placements again)")
    def undrain(self, request, queryset):
        for node in queryset:
            node_set_draining(name=node.name, draining=False)
            audit_record(user=request.user, action="node.undrain", target=node.name, detail={"via": "admin"})
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
class InstanceAdmin(RecordAdmin):
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
        return format_html("{} of {} ({}%)", readable_mb(mb_from_bytes(instance.bytes_done)),
                           readable_mb(mb_from_bytes(instance.bytes_total)), f"{pct:.1f}")

    @admin.display(description="error")
    def short_error(self, instance: Instance) -> str:
        return (instance.last_error.splitlines() or [""])[0][:120]

    @admin.action(description="Unload selected instances (weights stay on disk)")
    def unload(self, request, queryset):
        asked = 0
        for instance in queryset.select_related("model", "node"):
            if instance_unload(instance=instance):
                asked += 1
                audit_record(user=request.user, action="instance.unload", target=instance.model.model_id,
                             detail={"node": instance.node.name, "instance": instance.pk, "via": "admin"})
        self.message_user(request, f"Asked {asked} instance(s) to unload.")

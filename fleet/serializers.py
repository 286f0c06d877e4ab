"""Nodes and instances as the operator API shows them."""
from __future__ import annotations

from rest_framework import serializers

from .live import inflight_count
from .models import ACTIVE_PHASES, Instance, Node, Phase


class InstanceSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.model_id")
    node = serializers.CharField(source="node.name")
    pct = serializers.SerializerMethodField(help_text="Download progress, 0-100.")
    inflight = serializers.SerializerMethodField(help_text="Requests the gateway has in flight on it now.")

    class Meta:
        model = Instance
        fields = [
            "id", "model", "node", "replica", "phase", "gpu_indices", "vram_mb", "bytes_done", "bytes_total", "pct",
            "port", "slots", "inflight", "placement_reason", "last_error", "downloaded", "created_at", "started_at",
            "ready_at", "stopped_at", "download_seconds", "load_seconds",
        ]
        read_only_fields = fields

    def get_pct(self, instance: Instance) -> float:
        if instance.phase == Phase.READY:
            return 100.0
        return round(100 * instance.bytes_done / instance.bytes_total, 1) if instance.bytes_total else 0.0

    def get_inflight(self, instance: Instance) -> int:
        return inflight_count(instance.pk) if instance.phase in ACTIVE_PHASES else 0


class LoadRequestSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=100, help_text="A catalog id.")
    node = serializers.CharField(max_length=100, required=False, allow_blank=True,
                                 help_text="Load on this node; empty: where the planner chooses.")


class NodeSerializer(serializers.ModelSerializer):
    online = serializers.BooleanField(read_only=True)
    memory_total_mb = serializers.IntegerField(read_only=True)
    memory_free_mb = serializers.IntegerField(read_only=True)
    instances = serializers.SerializerMethodField()

    class Meta:
        model = Node
        fields = [
            "name", "hostname", "address", "online", "draining", "has_gpu", "gpus", "memory_total_mb",
            "memory_free_mb", "disk_free_mb", "model_dir", "models_on_disk", "instances", "agent_started_at",
            "last_heartbeat_at",
        ]
        read_only_fields = fields

    def get_instances(self, node: Node) -> list[dict]:
        live = [i for i in node.instances.all() if i.phase in ACTIVE_PHASES]
        return InstanceSerializer(live, many=True).data

"""The OpenAI model object, plus Porten's fields."""
from __future__ import annotations

from rest_framework import serializers

from .models import CatalogModel


class ModelObjectSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="model_id")
    object = serializers.SerializerMethodField()
    created = serializers.SerializerMethodField()
    owned_by = serializers.SerializerMethodField()
    capabilities = serializers.ListField(child=serializers.CharField(), read_only=True)
    ready = serializers.SerializerMethodField()

    class Meta:
        model = CatalogModel
        fields = [
            "id", "object", "created", "owned_by", "display_name", "context_length", "capabilities",
            "vram_mb", "disk_mb", "engine", "weight_format", "pinned", "ready",
        ]

    def get_object(self, obj: CatalogModel) -> str:
        return "model"

    def get_created(self, obj: CatalogModel) -> int:
        return int(obj.created_at.timestamp())

    def get_owned_by(self, obj: CatalogModel) -> str:
        return obj.hf_repo.split("/")[0] if obj.hf_repo else "porten"

    def get_ready(self, obj: CatalogModel) -> bool:
        return obj.model_id in self.context.get("ready_ids", ())

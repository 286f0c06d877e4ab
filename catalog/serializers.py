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
            "vram_mb", "disk_mb", "engine", "weight_format", "pinned", "ready", "aliases",
        ]

    def get_object(self, obj: CatalogModel) -> str:
        return "model"

    def get_created(self, obj: CatalogModel) -> int:
        return int(obj.created_at.timestamp())

    def get_owned_by(self, obj: CatalogModel) -> str:
        return obj.hf_repo.split("/")[0] if obj.hf_repo else "porten"

    def get_ready(self, obj: CatalogModel) -> bool:
        return obj.model_id in self.context.get("ready_ids", ())


class CatalogEntrySerializer(serializers.ModelSerializer):
    """A catalog entry as operators read and write it through /api/catalog/."""

    id = serializers.CharField(source="model_id", max_length=100)
    capabilities = serializers.ListField(child=serializers.CharField(), read_only=True)
    serving_args = serializers.ListField(
        child=serializers.CharField(), read_only=True,
        help_text="What the engine is started with beyond Porten's own flags: engine_args plus capability defaults.")
    hf_files = serializers.ListField(child=serializers.CharField(), required=False)
    engine_args = serializers.ListField(child=serializers.CharField(allow_blank=True), required=False)
    aliases = serializers.ListField(child=serializers.CharField(), required=False)

    class Meta:
        model = CatalogModel
        fields = [
            "id", "display_name", "description", "enabled", "pinned",
            "hf_repo", "hf_revision", "hf_files", "local_path",
            "weight_format", "engine", "chat_format", "context_length", "engine_args", "serving_args", "aliases",
            "supports_chat", "supports_tools", "supports_json", "supports_vision", "supports_embeddings",
            "capabilities", "vram_mb", "disk_mb",
            "min_replicas", "max_replicas", "target_inflight", "idle_ttl_s",
            "created_at", "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]
        # Uniqueness and the rest of the model's checks run in its own full_clean (catalog.services).
        validators = []

    def validate_id(self, value: str) -> str:
        if self.instance is not None and value != self.instance.model_id:
            raise serializers.ValidationError("An entry's id does not change (engines serve it by that name); "
                                              "add the new name to its aliases instead.")
        return value

"""Nodes (machines with GPUs, or a CPU with a memory budget) and instances (a model placed on a node)."""
from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


def node_stale_s() -> float:
    """A node whose last heartbeat is older than this is gone: with lost nodes swept every half
    heartbeat (fleet.tasks), its instances are failed within three heartbeats of its last one."""
    return 2.5 * settings.PORTEN_HEARTBEAT_S


class Node(models.Model):
    name = models.SlugField(max_length=100, unique=True)
    hostname = models.CharField(max_length=255, blank=True)
    address = models.CharField(
        max_length=255, default="127.0.0.1", help_text="Where the hub reaches this node's engines."
    )
    has_gpu = models.BooleanField(default=False)
    # [{"index", "name", "total_mb", "free_mb"}]; a CPU node has one pseudo-device: its memory budget.
    gpus = models.JSONField(default=list, blank=True)
    disk_free_mb = models.PositiveBigIntegerField(default=0)
    model_dir = models.CharField(max_length=500, blank=True)
    models_on_disk = models.JSONField(default=list, blank=True)
    # What the agent saw running at its last heartbeat: [{"instance", "pid"}].
    engines = models.JSONField(default=list, blank=True)
    agent_started_at = models.DateTimeField(null=True, blank=True)
    agent_pid = models.PositiveIntegerField(null=True, blank=True, help_text="The node agent's process on `hostname`.")
    draining = models.BooleanField(
        default=False, help_text="No new placements here; its models move elsewhere when next requested.")
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def online(self) -> bool:
        return self.last_heartbeat_at is not None and (
            timezone.now() - self.last_heartbeat_at).total_seconds() <= node_stale_s()

    @property
    def memory_total_mb(self) -> int:
        return sum(int(g.get("total_mb", 0)) for g in self.gpus)

    @property
    def memory_free_mb(self) -> int:
        return sum(int(g.get("free_mb", 0)) for g in self.gpus)


class Phase(models.TextChoices):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADING = "unloading"
    FAILED = "failed"
    STOPPED = "stopped"


# Phases in which an instance holds (or is about to hold) its model's one slot in the fleet.
ACTIVE_PHASES = (Phase.QUEUED, Phase.DOWNLOADING, Phase.LOADING, Phase.READY, Phase.DRAINING)
WARMING_PHASES = (Phase.QUEUED, Phase.DOWNLOADING, Phase.LOADING)
# Phases in which memory on the node is taken.
RESIDENT_PHASES = (Phase.QUEUED, Phase.DOWNLOADING, Phase.LOADING, Phase.READY, Phase.DRAINING, Phase.UNLOADING)


class Instance(models.Model):
    model = models.ForeignKey("catalog.CatalogModel", on_delete=models.PROTECT, related_name="instances")
    replica = models.PositiveSmallIntegerField(default=0, help_text="The model's replica slot this instance holds.")
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="instances")
    phase = models.CharField(max_length=20, choices=Phase.choices, default=Phase.QUEUED, db_index=True)
    gpu_indices = models.JSONField(default=list, blank=True)
    vram_mb = models.PositiveIntegerField(default=0, help_text="Footprint reserved on the node.")
    bytes_done = models.PositiveBigIntegerField(default=0)
    bytes_total = models.PositiveBigIntegerField(default=0)
    download_rate_bps = models.FloatField(default=0.0)
    port = models.PositiveIntegerField(null=True, blank=True)
    slots = models.PositiveSmallIntegerField(default=1, help_text="Requests the engine serves at once.")
    pid = models.PositiveIntegerField(null=True, blank=True)
    log_path = models.CharField(max_length=500, blank=True)
    placement_reason = models.TextField(blank=True)
    last_error = models.TextField(blank=True)
    downloaded = models.BooleanField(default=False, help_text="Weights were fetched by this load (not already on disk).")
    waits_for = models.JSONField(
        default=list, blank=True, help_text="Instances evicted for this one: its engine starts once they are gone."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    download_seconds = models.FloatField(null=True, blank=True)
    load_seconds = models.FloatField(null=True, blank=True, help_text="Engine start to healthy.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # Single flight across every hub process: one live instance per replica slot of a model.
            models.UniqueConstraint(
                fields=["model", "replica"], condition=Q(phase__in=[p.value for p in ACTIVE_PHASES]),
                name="fleet_one_active_instance_per_replica",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model_id} on {self.node_id} ({self.phase})"

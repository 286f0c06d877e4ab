"""CatalogModel: one model an operator offers, with where its weights come from and what it needs."""
from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import F, Q

from .engine_args import default_engine_args, engine_args_errors, has_flag, tool_parser_for

# Canonical ids are slugs that may carry a version dot, as model names do: "qwen2.5-coder-32b".
MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$|^[a-z0-9]$"
model_id_validator = RegexValidator(
    MODEL_ID_PATTERN,
    "Use lowercase letters, digits, dots, hyphens and underscores, starting and ending with a letter or digit.",
    code="invalid_model_id",
)


class WeightFormat(models.TextChoices):
    GGUF = "gguf", "GGUF"
    SAFETENSORS = "safetensors", "safetensors"


class EngineName(models.TextChoices):
    LLAMACPP = "llamacpp", "llama.cpp"
    VLLM = "vllm", "vLLM"


# Which engine can serve which weight format.
ENGINE_FOR_FORMAT = {WeightFormat.GGUF: EngineName.LLAMACPP, WeightFormat.SAFETENSORS: EngineName.VLLM}

CAPABILITIES = ("chat", "tools", "json", "vision", "embeddings")

# Requests an engine serves at once: llama-cpp-python's server has one slot; vLLM batches up to its
# max_num_seqs (256 by default). The gateway holds each engine to this, queueing the rest.
ENGINE_SLOTS = {EngineName.LLAMACPP: 1, EngineName.VLLM: 256}


class CatalogModel(models.Model):
    model_id = models.CharField(
        "canonical id", max_length=100, unique=True, validators=[model_id_validator],
        help_text="What clients send as 'model', e.g. qwen2.5-coder-32b.",
    )
    display_name = models.CharField(max_length=200)
    description = models.TextField(blank=True)

    hf_repo = models.CharField("Hugging Face repo", max_length=200, blank=True, help_text="e.g. Qwen/Qwen3-8B-GGUF")
    hf_revision = models.CharField(
        "revision", max_length=100, blank=True, default="main",
        help_text="Branch, tag or commit; pin a commit for reproducible loads.",
    )
    hf_files = models.JSONField(
        "files or patterns", default=list, blank=True,
        help_text='File names or glob patterns to fetch, e.g. ["*Q4_K_M.gguf"]; empty fetches the whole repo.',
    )
    local_path = models.CharField(
        max_length=500, blank=True,
        help_text="A file or folder on the node; used instead of the Hub when set.",
    )

    weight_format = models.CharField(max_length=20, choices=WeightFormat.choices)
    engine = models.CharField(max_length=20, choices=EngineName.choices)
    chat_format = models.CharField(
        max_length=50, blank=True,
        help_text="llama.cpp chat format for GGUF files without a chat template (e.g. gemma).",
    )
    context_length = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    engine_args = models.JSONField(
        "engine arguments", default=list, blank=True,
        help_text='Extra arguments for the engine, e.g. ["--max-num-seqs", "64"]. Flags Porten sets itself '
                  '(port, host, model, context length, memory) are refused.')
    aliases = models.JSONField(
        default=list, blank=True,
        help_text='Other names clients may send as "model", e.g. ["gpt-4o-mini"]; unique across the catalog.')

    supports_chat = models.BooleanField("chat", default=True)
    supports_tools = models.BooleanField("tools", default=False)
    supports_json = models.BooleanField("JSON mode", default=False)
    supports_vision = models.BooleanField("vision", default=False)
    supports_embeddings = models.BooleanField(
        "embeddings", default=False, help_text="Serves /v1/embeddings (its engine starts in embedding mode).")

    vram_mb = models.PositiveIntegerField(
        "VRAM footprint (MB)", validators=[MinValueValidator(1)],
        help_text="Memory the loaded model needs, weights plus KV cache at the context length.",
    )
    disk_mb = models.PositiveIntegerField("size on disk (MB)", validators=[MinValueValidator(1)])

    pinned = models.BooleanField(default=False, help_text="Never evicted to make room for another model.")
    min_replicas = models.PositiveSmallIntegerField(
        default=0, help_text="Replicas kept loaded at all times (loaded when nodes start, never idle-unloaded).")
    max_replicas = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1)],
        help_text="At most this many replicas, on different nodes, added while each is busier than its target.")
    target_inflight = models.PositiveSmallIntegerField(
        "target requests per replica", null=True, blank=True, validators=[MinValueValidator(1)],
        help_text="Concurrent requests one replica should carry; above it for a few seconds, another "
                  "replica loads. Empty: the engine's parallel slots.")
    idle_ttl_s = models.PositiveIntegerField(
        "idle time (s)", null=True, blank=True, validators=[MinValueValidator(1)],
        help_text="Unload after this long without a request; empty: the demand window (PORTEN_DEMAND_WINDOW_S).")
    enabled = models.BooleanField(default=True, help_text="Offered to users through /v1.")

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_id"]
        verbose_name = "catalog model"
        constraints = [
            models.CheckConstraint(condition=Q(vram_mb__gt=0), name="catalog_vram_positive"),
            models.CheckConstraint(condition=Q(disk_mb__gt=0), name="catalog_disk_positive"),
            models.CheckConstraint(condition=Q(context_length__gt=0), name="catalog_context_positive"),
            models.CheckConstraint(
                condition=Q(weight_format="gguf", engine="llamacpp") | Q(weight_format="safetensors", engine="vllm"),
                name="catalog_engine_matches_format",
            ),
            models.CheckConstraint(condition=~Q(hf_repo="") | ~Q(local_path=""), name="catalog_has_source"),
            models.CheckConstraint(condition=Q(max_replicas__gte=1) & Q(min_replicas__lte=F("max_replicas")),
                                   name="catalog_replicas_in_order"),
        ]

    def __str__(self) -> str:
        return self.model_id

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.weight_format and self.engine and ENGINE_FOR_FORMAT.get(self.weight_format) != self.engine:
            errors["engine"] = (
                f"{self.get_engine_display()} cannot serve {self.get_weight_format_display()} weights; "
                f"use {ENGINE_FOR_FORMAT[self.weight_format].label}."
            )
        if not self.hf_repo and not self.local_path:
            errors["hf_repo"] = "Give a Hugging Face repo or a local path."
        if self.hf_repo and "/" not in self.hf_repo:
            errors["hf_repo"] = "A Hugging Face repo id looks like 'org/name'."
        if not isinstance(self.hf_files, list) or not all(isinstance(f, str) and f for f in self.hf_files):
            errors["hf_files"] = "A list of file names or glob patterns."
        if self.max_replicas is not None and self.min_replicas is not None and self.min_replicas > self.max_replicas:
            errors["min_replicas"] = f"At most max_replicas ({self.max_replicas})."
        if self.engine and (problems := engine_args_errors(self.engine, self.engine_args)):
            errors["engine_args"] = " ".join(problems)
        elif (self.engine == EngineName.VLLM and self.supports_tools and not tool_parser_for(self.hf_repo)
              and not has_flag(self.engine_args, "--tool-call-parser")):
            errors["engine_args"] = ("Tool calling on vLLM needs a parser for this model's family, and Porten "
                                     "knows none for this repo: add --tool-call-parser <name> (see vLLM's docs).")
        if problem := self.aliases_problem():
            errors["aliases"] = problem
        if self.model_id and (owner := next((other for other, names in CatalogModel.objects.exclude(
                pk=self.pk).values_list("model_id", "aliases") if self.model_id in (names or [])), None)):
            errors["model_id"] = f"{self.model_id!r} is an alias of the model {owner!r}."
        if errors:
            raise ValidationError(errors)

    def aliases_problem(self) -> str:
        """Why these aliases cannot be used, or "": slugs like ids, none equal to any id or alias of
        another model (or to this one's own id)."""
        aliases = self.aliases
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            return 'A list of names, e.g. ["gpt-4o-mini"].'
        bad = [a for a in aliases if not re.fullmatch(MODEL_ID_PATTERN, a) or len(a) > 100]
        if bad:
            return f"{bad[0]!r} is not a valid name: {model_id_validator.message}"
        if len(set(aliases)) != len(aliases) or self.model_id in aliases:
            return "Each alias once, and none equal to this model's own id."
        for other_id, other_aliases in CatalogModel.objects.exclude(pk=self.pk).values_list("model_id", "aliases"):
            taken = {other_id, *(other_aliases or [])}
            if clash := next((a for a in aliases if a in taken), None):
                return f"{clash!r} already names the model {other_id!r}."
        return ""

    @property
    def serving_args(self) -> list[str]:
        """The engine's extra arguments: the operator's, plus what the model's capabilities need."""
        args = list(self.engine_args or [])
        return args + default_engine_args(engine=self.engine, supports_tools=self.supports_tools,
                                          repo=self.hf_repo or self.model_id, args=args)

    @property
    def engine_slots(self) -> int:
        return ENGINE_SLOTS.get(self.engine, 1)

    @property
    def replica_target(self) -> int:
        """Concurrent requests one replica should carry: the catalog's, else its engine's slots."""
        return self.target_inflight or self.engine_slots

    @property
    def capabilities(self) -> list[str]:
        return [name for name in CAPABILITIES if getattr(self, f"supports_{name}")]

    @property
    def source(self) -> str:
        if self.local_path:
            return f"local:{self.local_path}"
        return f"hf:{self.hf_repo}@{self.hf_revision or 'main'}"

"""The engine interface: what a node needs to know to start, check and stop one model server."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class EngineLaunch:
    """Everything an engine needs to serve one instance (a catalog model placed on a node)."""

    instance_id: int
    node_name: str
    served_model_name: str  # the catalog id; clients send it as "model"
    model_path: Path  # a .gguf file for llama.cpp, a folder of safetensors for vLLM
    context_length: int
    port: int
    host: str = "127.0.0.1"
    chat_format: str = ""  # llama.cpp chat format, e.g. "gemma"; "" = the model's own template
    vram_mb: int = 0  # the catalog footprint
    gpu_indices: tuple[int, ...] = ()  # empty = CPU
    gpu_total_mb: int = 0  # total memory of one of those GPUs
    extra_args: tuple[str, ...] = ()
    embeddings: bool = False  # serve /v1/embeddings (the catalog's embeddings capability)

    def __post_init__(self) -> None:
        # Callers build launches from ORM rows and JSON; normalise so the dataclass stays hashable.
        object.__setattr__(self, "model_path", Path(self.model_path))
        object.__setattr__(self, "gpu_indices", tuple(int(i) for i in self.gpu_indices))
        object.__setattr__(self, "extra_args", tuple(str(a) for a in self.extra_args))
        if self.context_length <= 0:
            raise ValueError(f"context_length must be positive, got {self.context_length}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.vram_mb < 0 or self.gpu_total_mb < 0:
            raise ValueError("vram_mb and gpu_total_mb must not be negative")
        if len(set(self.gpu_indices)) != len(self.gpu_indices):
            raise ValueError(f"gpu_indices has duplicates: {self.gpu_indices}")

    @property
    def uses_gpu(self) -> bool:
        return bool(self.gpu_indices)


class Engine(ABC):
    """One kind of OpenAI-compatible server: its command line, health check and memory arguments."""

    name: ClassVar[str]
    health_path: ClassVar[str]
    # Asked of a running engine to tell a hung one from a busy one: it must answer while the engine
    # generates (None: the health path does).
    liveness_path: ClassVar[str | None] = None
    # How long a polite stop may take before SIGKILL; engines that free GPU memory need longer.
    stop_grace_s: ClassVar[float] = 10.0

    @abstractmethod
    def command(self, launch: EngineLaunch) -> list[str]:
        """The argv that serves `launch`, memory arguments and extra_args included."""

    @abstractmethod
    def memory_arguments(self, launch: EngineLaunch) -> list[str]:
        """The part of command() that places the model in (GPU) memory."""

    def environment(self, launch: EngineLaunch) -> dict[str, str]:
        """Extra environment for the process, on top of the node's own."""
        # An empty CUDA_VISIBLE_DEVICES hides every GPU, so a CPU instance cannot grab one by default.
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in launch.gpu_indices)}

    def health_url(self, launch: EngineLaunch) -> str:
        return f"http://{_connect_host(launch.host)}:{launch.port}{self.health_path}"

    def slots(self, launch: EngineLaunch) -> int:
        """Requests this engine serves at once; the gateway sends it no more."""
        return 1

    def liveness_url(self, host: str, port: int) -> str:
        return f"http://{_connect_host(host)}:{port}{self.liveness_path or self.health_path}"

    def base_url(self, launch: EngineLaunch) -> str:
        """Where the OpenAI-compatible API of this instance lives (…/v1)."""
        return f"http://{_connect_host(launch.host)}:{launch.port}/v1"


def _connect_host(host: str) -> str:
    # A server bound to every interface is reached through loopback from its own node.
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host

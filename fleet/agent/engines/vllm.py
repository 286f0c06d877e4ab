"""The vLLM engine: serves safetensors models on one or more GPUs, sized to the catalog footprint."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar

from fleet.agent.engines.base import Engine, EngineLaunch

MIN_GPU_MEMORY_UTILIZATION = Fraction(5, 100)
MAX_GPU_MEMORY_UTILIZATION = Fraction(95, 100)


def gpu_memory_utilization(*, vram_mb: int, gpu_count: int, gpu_total_mb: int) -> str:
    """The share of each GPU this instance may take, as vLLM's --gpu-memory-utilization wants it.

    vLLM's default (0.9) claims the whole card, so two models could never share one; the catalog
    footprint split over the GPUs, rounded up to 2 decimals, leaves the rest to other instances.
    """
    if gpu_count <= 0:
        raise ValueError("vLLM needs at least one GPU")
    if gpu_total_mb <= 0:
        raise ValueError("vLLM needs the GPU's total memory (gpu_total_mb)")
    if vram_mb <= 0:
        raise ValueError("vLLM needs the model's VRAM footprint (vram_mb)")
    per_gpu_mb = Fraction(vram_mb, gpu_count)
    if per_gpu_mb > gpu_total_mb:
        raise ValueError(
            f"footprint {vram_mb} MB over {gpu_count} GPU(s) needs {float(per_gpu_mb):.0f} MB each, "
            f"more than the {gpu_total_mb} MB one GPU has"
        )
    # Exact arithmetic: a float like 0.25000000000000006 must not round up to 0.26.
    share = Fraction(math.ceil(per_gpu_mb / gpu_total_mb * 100), 100)
    share = min(max(share, MIN_GPU_MEMORY_UTILIZATION), MAX_GPU_MEMORY_UTILIZATION)
    return f"{float(share):.2f}"


class VllmEngine(Engine):
    """`vllm serve` (OpenAI-compatible server)."""

    name: ClassVar[str] = "vllm"
    health_path: ClassVar[str] = "/health"
    max_num_seqs: ClassVar[int] = 256  # vLLM's default batch: requests it serves at once

    def slots(self, launch: EngineLaunch) -> int:
        return self.max_num_seqs
    # vLLM tears down worker processes and CUDA contexts on SIGTERM; give it time to free the GPU.
    stop_grace_s: ClassVar[float] = 30.0

    def __init__(self, *, binary: str = "vllm") -> None:
        self.binary = binary

    def command(self, launch: EngineLaunch) -> list[str]:
        argv = [
            self.binary, "serve", str(launch.model_path),
            "--served-model-name", launch.served_model_name,
            "--host", launch.host,
            "--port", str(launch.port),
            "--max-model-len", str(launch.context_length),
        ]
        return argv + self.memory_arguments(launch) + list(launch.extra_args)

    def memory_arguments(self, launch: EngineLaunch) -> list[str]:
        gpu_count = len(launch.gpu_indices)
        args = [
            "--gpu-memory-utilization",
            gpu_memory_utilization(
                vram_mb=launch.vram_mb, gpu_count=gpu_count, gpu_total_mb=launch.gpu_total_mb
            ),
        ]
        if gpu_count > 1:
            args += ["--tensor-parallel-size", str(gpu_count)]
        return args

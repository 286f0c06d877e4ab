"""Engine registry: maps the catalog's `engine` field to the class that serves it."""

from __future__ import annotations

from fleet.agent.engines.base import Engine, EngineLaunch
from fleet.agent.engines.llamacpp import LlamaCppEngine, LlamaServerEngine
from fleet.agent.engines.vllm import VllmEngine

ENGINES: dict[str, type[Engine]] = {
    LlamaCppEngine.name: LlamaCppEngine,
    VllmEngine.name: VllmEngine,
}


class UnknownEngine(KeyError):
    """The catalog names an engine this node does not know."""

    def __str__(self) -> str:
        return f"unknown engine {self.args[0]!r}; known: {', '.join(sorted(ENGINES))}"


def engine_for(name: str, *, llama_server_bin: str | None = None, vllm_bin: str = "vllm",
               llama_server_parallel: int = 1) -> Engine:
    """The engine for a catalog `engine` value, configured with this node's binaries."""
    if name not in ENGINES:
        raise UnknownEngine(name)
    if name == LlamaCppEngine.name:
        # A configured llama-server binary replaces the Python server for the same GGUF models.
        if llama_server_bin:
            return LlamaServerEngine(llama_server_bin, parallel=llama_server_parallel)
        return LlamaCppEngine()
    if name == VllmEngine.name:
        return VllmEngine(binary=vllm_bin)
    return ENGINES[name]()


__all__ = [
    "ENGINES",
    "Engine",
    "EngineLaunch",
    "LlamaCppEngine",
    "LlamaServerEngine",
    "UnknownEngine",
    "VllmEngine",
    "engine_for",
]

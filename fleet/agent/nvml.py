"""The one small adapter through which Porten reads GPUs (NVML via nvidia-ml-py's `pynvml`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from porten.units import MB

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    total_mb: int
    free_mb: int


class GpuReader(Protocol):
    def read(self) -> list[GpuReading]: ...


class NvmlReader:
    """Reads every GPU NVML sees; an empty list means no GPU (no driver, no library, no device)."""

    def read(self) -> list[GpuReading]:
        try:
            import pynvml
        except ImportError:
            return []
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            logger.debug("no NVML here: %s", exc)
            return []
        try:
            readings = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                readings.append(GpuReading(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_mb=int(memory.total // MB),
                    free_mb=int(memory.free // MB),
                ))
            return readings
        finally:
            pynvml.nvmlShutdown()


_reader: GpuReader = NvmlReader()


def gpu_reader() -> GpuReader:
    return _reader


def set_gpu_reader(reader: GpuReader) -> GpuReader:
    """Swap the reader (tests pass a fake with the same structures); returns the previous one."""
    global _reader
    previous, _reader = _reader, reader
    return previous

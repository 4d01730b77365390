"""Made-up machines and settings for planning a transformers load, without torch."""

from __future__ import annotations

from pathlib import Path

from tanglebox.backends.transformers.plan import DeviceInfo
from tanglebox.settings import Settings, defaults, load_settings
from tests.conftest import write_settings

GIB = 2**30
GPU_BOX = DeviceInfo(cuda_devices=2, gpu_memory_bytes=(20 * GIB, 22 * GIB), bitsandbytes=True,
                     cpu_available_bytes=64 * GIB)
CPU_BOX = DeviceInfo(cpu_available_bytes=16 * GIB)


def plan_settings(**values):
    settings = defaults()
    settings.update(backend="transformers", **values)
    return settings


def settings_for(tmp_path: Path, **values) -> Settings:
    """Settings read from a settings.json in ``tmp_path``, as a user would write them."""
    return load_settings(write_settings(tmp_path, backend="transformers", **values))

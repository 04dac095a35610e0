"""The machine a benchmark row is measured on (imported from benchmarks/ as a plain module)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model ('AMD EPYC 7B13'), not only its architecture: /proc/cpuinfo's model name,
    else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_description() -> str:
    """``cpu (<model>, <n> cores)``."""
    return f"cpu ({cpu_name()}, {os.cpu_count()} cores)"


def _gpu_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def device_name(device) -> str:
    """The GPU's name on a CUDA ``device``, else :func:`cpu_description`."""
    return _gpu_name(device) if device.type == "cuda" else cpu_description()


def device_model(device) -> str:
    """The GPU's name on a CUDA ``device``, else the CPU model alone (for CSVs whose thread count
    has a column of its own)."""
    return _gpu_name(device) if device.type == "cuda" else cpu_name()

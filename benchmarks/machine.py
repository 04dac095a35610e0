"""The machine a benchmark row is measured on (imported from benchmarks/ as a plain module)."""

from __future__ import annotations

import importlib.util
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


def _lorambo_cpus():
    """``lorambo/experiments/cpus.py``, loaded by its path: the one definition of
    :func:`usable_cpus`, shared with the experiment reports. It imports only the standard
    library, so this loads neither the lorambo package nor torch, which gpu_check.py must not
    import before its build stage (and its own python may lack the checkout on sys.path)."""
    path = Path(__file__).resolve().parents[1] / "lorambo" / "experiments" / "cpus.py"
    spec = importlib.util.spec_from_file_location("_lorambo_experiments_cpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The logical CPUs this process may run on: its affinity mask (taskset, a container's cpuset),
# which ``os.cpu_count()`` ignores: that counts every logical CPU of the machine, hyperthreads included.
usable_cpus = _lorambo_cpus().usable_cpus


def cpus_label() -> str:
    """``<n> logical CPUs``, or ``<n> of <m> logical CPUs usable`` when the affinity mask leaves
    this process fewer than the machine has."""
    usable, logical = usable_cpus(), os.cpu_count()
    if logical is None or logical == usable:
        return f"{usable} logical CPUs"
    return f"{usable} of {logical} logical CPUs usable"


def cpu_description() -> str:
    """``cpu (<model>, <cpus_label()>)``."""
    return f"cpu ({cpu_name()}, {cpus_label()})"


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

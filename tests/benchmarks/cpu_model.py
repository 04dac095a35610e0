"""The CPU model as /proc/cpuinfo names it and the CPUs this process may use: what a benchmark
row's device column must say (read here independently of benchmarks/machine.py)."""

import os
from pathlib import Path

import pytest


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
              if line.startswith("model name")] if info.exists() else []
    if not models:
        pytest.skip("no CPU model name in /proc/cpuinfo on this machine")
    return models[0]


def cpu_device() -> str:
    """``cpu (<model>, <n> logical CPUs)``; ``<n> of <m> logical CPUs usable`` when this
    process's affinity mask holds fewer CPUs than the machine."""
    usable = len(os.sched_getaffinity(0))
    count = f"{usable} logical CPUs" if usable == os.cpu_count() else f"{usable} of {os.cpu_count()} logical CPUs usable"
    return f"cpu ({cpu_model()}, {count})"

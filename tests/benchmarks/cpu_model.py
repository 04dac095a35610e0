"""The CPU model as /proc/cpuinfo names it: what a benchmark row's device column must say
(read here independently of benchmarks/machine.py)."""

from pathlib import Path

import pytest


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
              if line.startswith("model name")] if info.exists() else []
    if not models:
        pytest.skip("no CPU model name in /proc/cpuinfo on this machine")
    return models[0]

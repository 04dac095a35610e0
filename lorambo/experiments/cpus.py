"""How many CPUs a run had, as the results and reports say it.

benchmarks/machine.py loads this file by its path (without the lorambo package, before
gpu_check's build), so it imports only the standard library.
"""

from __future__ import annotations

import os

__all__ = ["usable_cpus", "cpus_line"]


def usable_cpus() -> int:
    """The logical CPUs this process may run on (its affinity mask); ``os.cpu_count()``, kept
    beside it as ``cpu_count``, counts every logical CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def cpus_line(env: dict) -> str:
    """``<n> logical CPUs`` (``<n> of <m> logical CPUs usable`` under an affinity mask); an
    environment recorded before ``usable_cpus`` existed says ``<m> logical CPUs``."""
    logical, usable = env.get("cpu_count"), env.get("usable_cpus")
    if usable is None or usable == logical:
        return f"{logical if usable is None else usable} logical CPUs"
    return f"{usable} of {logical} logical CPUs usable"

"""Run a worker script as two gloo processes and read back what each saved, failing (never
hanging) when a process does not finish in time.

The script is called as ``python WORKER *args RANK WORLD STORE_FILE OUT_FILE`` and saves its
results with ``torch.save(..., OUT_FILE)``; :func:`attempt` records a call's outcome there.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def attempt(fn):
    """``("ok", fn())``, or ``("error", type name, message)`` of what it raised: a worker saves
    either, and the test compares the errors across processes."""
    try:
        return ("ok", fn())
    except Exception as err:  # noqa: BLE001 - compared across processes, not handled
        return ("error", type(err).__name__, str(err))


def run_two_processes(worker: Path, tmp_path: Path, *args: str, timeout: float = 60.0) -> list:
    """Each process's saved results, by rank."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    # output to files, not pipes: a pipe read only after the other worker finished can fill up
    # and block its writer in the middle of a collective
    logs = [tmp_path / f"worker{r}.log" for r in range(2)]
    files = [open(log, "w") for log in logs]
    procs = [subprocess.Popen([sys.executable, str(worker), *args, str(r), "2", str(tmp_path / "store"),
                               str(tmp_path / f"rank{r}.pt")], env=env, stdout=files[r], stderr=subprocess.STDOUT)
             for r in range(2)]
    hung = False
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
    finally:  # a process left waiting in a collective must not outlive the test
        for p, f in zip(procs, files):
            p.kill()
            p.wait()
            f.close()
    outs = [log.read_text()[-3000:] for log in logs]
    if hung:
        pytest.fail(f"{worker.name} {args}: a process did not finish in {timeout} s (waiting in a "
                    f"collective?); outputs: {outs}")
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"{worker.name} {args}: process {rank} exited with {p.returncode}:\n{out}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def spawn_two(fn, args: tuple, start_method: str, timeout: float = 300.0) -> None:
    """``torch.multiprocessing.start_processes(fn, args, nprocs=2)``, failing (never hanging) when
    the processes have not finished in ``timeout`` s; a worker's exception is raised as
    ``start_processes`` raises it."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                pytest.fail(f"{getattr(fn, '__name__', fn)}: the 2 processes did not finish in {timeout} s "
                            "(waiting in a collective?)")
    finally:  # a process left waiting in a collective must not outlive the test
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()

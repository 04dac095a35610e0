"""Two gloo processes that run different layers (routed experts) reproduce the single-process
FisherProxy, data_covariance and gradient_sensitivity estimates on the union of their batches,
and LoRAMBoOptimizer keeps the same targets on both."""

import importlib.util
from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes

WORKER = Path(__file__).with_name("routed_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _run_two_processes(tmp_path):
    """(the single-process reference on all batches, each process's results)."""
    spec = importlib.util.spec_from_file_location("sensitivity_routed_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    single = worker.compute(*worker.setup())
    return single, run_two_processes(WORKER, tmp_path)

def test_layers_reached_on_one_process_only_match_single_process(tmp_path):
    """Each process used to reduce only the layers it had seen: FisherProxy summed process 0's
    expert-0 row with process 1's expert-1 row (wrong traces, one expert missing), and
    data_covariance refused a layer its own batches did not run."""
    single, results = _run_two_processes(tmp_path)
    assert set(single["fisher"]) == {"inp", "e0", "e1"}
    for r, got in enumerate(results):
        assert set(got["fisher"]) == set(single["fisher"])
        for name, (value, stderr, n) in single["fisher"].items():
            assert got["fisher"][name][0] == pytest.approx(value, rel=1e-10), (r, name)
            assert got["fisher"][name][1] == pytest.approx(stderr, rel=1e-8), (r, name)
            assert got["fisher"][name][2] == n, (r, name)
        assert set(got["data"]) == set(single["data"])
        for name, cov in single["data"].items():
            torch.testing.assert_close(got["data"][name], cov, rtol=1e-10, atol=1e-12, msg=f"{r} {name}")
        for name, value in single["gradient"].items():
            assert got["gradient"][name] == pytest.approx(value, rel=1e-10), (r, name)


def test_allocator_keeps_a_target_that_another_process_reaches(tmp_path):
    """LoRAMBoOptimizer drops the targets its batches do not reach; each process checked
    its own, so process 0 dropped e1 and process 1 e0, and the gradient sums of e0 and e1 were
    added into one value reported for a different layer on each process."""
    single, results = _run_two_processes(tmp_path)
    for r, got in enumerate(results):
        assert got["allocator"].keys() == single["gradient"].keys()
        for name, value in single["gradient"].items():
            assert got["allocator"][name] == pytest.approx(value, rel=1e-10), (r, name)

"""Two gloo processes deciding online growth through the grouped sketch kernels take identical
decisions, with one all-reduce per power-iteration product for all layers."""

from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes

WORKER = Path(__file__).with_name("ddp_sketch_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_kernel_path_decides_identically(tmp_path):
    pytest.importorskip("triton")
    data_seed = str(int(torch.randint(0, 2**20, ())))
    a, b = run_two_processes(WORKER, tmp_path, data_seed, timeout=240)
    assert a["records"] == b["records"] and any(r["event"] == "grow" for r in a["records"])
    assert a["per_decision"] == b["per_decision"] == [2 * 1 + 2] * 2  # not per layer
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key

"""Two gloo processes deciding online growth through the grouped sketch kernels take identical
decisions, with one all-reduce per power-iteration product for all layers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_sketch_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_kernel_path_decides_identically(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2])] + sys.path))
    data_seed = str(int(torch.randint(0, 2**20, ())))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(tmp_path / "store"),
                               str(tmp_path / f"rank{r}.pt"), data_seed], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["records"] == b["records"] and any(r["event"] == "grow" for r in a["records"])
    assert a["per_decision"] == b["per_decision"] == [2 * 1 + 2] * 2  # not per layer
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key

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
    # output to files, not pipes: a pipe read only after the other worker finished can fill up
    # and block its writer in the middle of a collective
    log = [open(tmp_path / f"worker{r}.log", "w") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(tmp_path / "store"),
                               str(tmp_path / f"rank{r}.pt"), data_seed], env=env,
                              stdout=log[r], stderr=subprocess.STDOUT) for r in range(2)]
    try:
        for p in procs:
            p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pass
    finally:  # a worker left waiting must not outlive the test; its stacks are in its output
        for p in procs:
            p.kill()
            p.wait()
        for f in log:
            f.close()
    outs = [(tmp_path / f"worker{r}.log").read_text() for r in range(2)]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"worker {rank} (return code {p.returncode}):\n{out[-4000:]}"
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["records"] == b["records"] and any(r["event"] == "grow" for r in a["records"])
    assert a["per_decision"] == b["per_decision"] == [2 * 1 + 2] * 2  # not per layer
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key

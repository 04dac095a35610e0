"""Two gloo ranks, each with half of the batches, reproduce the single-process estimates."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_match_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + sys.path))
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(store),
                               str(tmp_path / f"rank{r}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    spec = importlib.util.spec_from_file_location("sensitivity_dist_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    single = worker.compute(*worker.setup())           # reference: all batches, one process
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out.decode()[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:
        for key in ("hutchinson", "xtrace", "opnorm"):
            for name, e in single[key].items():
                assert got[key][name].value == pytest.approx(e.value, rel=1e-9), (key, name)
                assert got[key][name].stderr == pytest.approx(e.stderr, rel=1e-6, abs=1e-12)
                assert got[key][name].num_probes == e.num_probes
        assert got["gradient"] == pytest.approx(single["gradient"], rel=1e-10)
        for name, g in single["data"].items():
            torch.testing.assert_close(got["data"][name], g, rtol=1e-10, atol=1e-12)

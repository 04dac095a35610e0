"""Two gloo ranks, each with half of the batches, reproduce the single-process estimates."""

import importlib.util
from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_match_single_process(tmp_path):
    spec = importlib.util.spec_from_file_location("sensitivity_dist_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    single = worker.compute(*worker.setup())           # reference: all batches, one process
    ranks = run_two_processes(WORKER, tmp_path)
    for got in ranks:
        for key in ("hutchinson", "xtrace", "opnorm"):
            assert got[key].keys() == single[key].keys() and single[key], key
            for name, e in single[key].items():
                assert got[key][name].value == pytest.approx(e.value, rel=1e-9), (key, name)
                assert got[key][name].stderr == pytest.approx(e.stderr, rel=1e-6, abs=1e-12)
                assert got[key][name].num_probes == e.num_probes
        assert got["gradient"] == pytest.approx(single["gradient"], rel=1e-10)
        assert got["data"].keys() == single["data"].keys() and single["data"]
        for name, g in single["data"].items():
            torch.testing.assert_close(got["data"][name], g, rtol=1e-10, atol=1e-12)

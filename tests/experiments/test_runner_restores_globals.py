"""run_experiment from Python (a notebook) leaves the caller's torch settings as they were: the
units run on ``cfg.threads`` threads and seed torch's generator, and both stayed changed after
the call (a caller on 4 threads went on with 1, its random stream reseeded)."""

import pytest
import torch

from lorambo.experiments import config as presets
from lorambo.experiments import runner
from lorambo.experiments.executor import Executor


@pytest.fixture
def caller_threads():
    """A thread count the tiny preset's ``threads=1`` differs from, restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


@pytest.mark.parametrize("fails", [False, True])
def test_threads_and_random_stream_come_back(tmp_path, monkeypatch, caller_threads, fails):
    cfg = presets.tiny(methods=("uniform",)).replace(tasks=("planted",))
    ran = []

    def units(cfg, pending, *args, **kwargs):  # what running them does to the process: no training
        Executor(cfg)            # sets cfg.threads
        torch.manual_seed(1234)  # a unit seeds its run
        ran.append((torch.get_num_threads(), torch.rand(1)))
        if fails:
            raise RuntimeError("a unit failed")
        return pending           # left for later, as under a time limit

    monkeypatch.setattr(runner, "run_units", units)
    torch.manual_seed(7)
    want = torch.rand(4)
    torch.manual_seed(7)
    if fails:
        with pytest.raises(RuntimeError, match="a unit failed"):
            runner.run_experiment(cfg, out_dir=tmp_path, progress=False, echo=lambda *a: None, time_limit=60.0)
    else:
        result = runner.run_experiment(cfg, out_dir=tmp_path, progress=False, echo=lambda *a: None, time_limit=60.0)
        assert result["complete"] is False
    assert ran and ran[0][0] == 1
    assert torch.get_num_threads() == caller_threads
    assert torch.equal(torch.rand(4), want)  # the stream goes on as if the experiment had not run

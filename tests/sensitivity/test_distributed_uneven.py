"""Two gloo processes with uneven, empty or failing shares of the batches: every estimator either
reproduces the single-process result on the union of the batches, or raises on *both* processes
(a process that raised alone used to leave the other waiting in a collective forever)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes

WORKER = Path(__file__).with_name("uneven_worker.py")
TIMEOUT_S = 40  # a hang shows as a failure; a run takes ~10 s

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _worker():
    spec = importlib.util.spec_from_file_location("sensitivity_uneven_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker


def _run(tmp_path, split):
    """Each process's {estimator: outcome}."""
    return run_two_processes(WORKER, tmp_path, split, timeout=TIMEOUT_S)


def _assert_close(got, want, where):
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            _assert_close(got[k], want[k], (where, k))
    elif isinstance(want, tuple):
        for g, w in zip(got, want):
            _assert_close(g, w, where)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=str(where))
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), where


@pytest.mark.parametrize("split", ["3,1", "4,0"])
def test_uneven_and_empty_shares_match_single_process_on_the_union(tmp_path, split):
    """Sums and counts are reduced over processes, so a process with fewer (or no) batches is
    weighted by its batch count; a process without batches used to raise ValueError('no
    batches') on its own while the other waited in the estimator's first collective."""
    worker = _worker()
    single = worker.compute(*worker.setup())
    assert all(outcome[0] == "ok" for outcome in single.values()), single
    for rank, got in enumerate(_run(tmp_path, split)):
        for name, (status, *result) in single.items():
            assert got[name][0] == "ok", (rank, name, got[name])
            _assert_close(got[name][1], result[0], (rank, name))


def test_no_batches_on_any_process_is_the_same_error_on_both(tmp_path):
    for rank, got in enumerate(_run(tmp_path, "0,0")):
        for name, outcome in got.items():
            if name == "fisher":  # it counts backward passes, not batches
                assert outcome[:2] == ("error", "RuntimeError") and "saw no backward pass" in outcome[2]
                continue
            assert outcome[0] == "error" and outcome[1] == "ValueError", (rank, name, outcome)
            assert "no batches on any of the 2 processes" in outcome[2], (rank, name, outcome)


def test_an_error_on_one_process_is_raised_on_both(tmp_path):
    """Process 1's loss_fn raises on its batch: it raises that error, and process 0, whose batches
    are fine, raises a RuntimeError naming process 1 and its error instead of hanging."""
    first, second = _run(tmp_path, "bad")
    for name in set(_worker().ESTIMATORS) - {"fisher"}:  # the bad batch fails the training loop itself
        assert second[name][:2] == ("error", "ValueError"), (name, second[name])
        assert "is not a pair of tensors" in second[name][2], (name, second[name])
        assert first[name][:2] == ("error", "RuntimeError"), (name, first[name])
        assert "process 1: ValueError: loss_fn: batch 'bad' is not a pair of tensors" in first[name][2], \
            (name, first[name])


def test_settings_that_differ_between_processes_are_an_error_on_both(tmp_path):
    """Another seed drew other probes (a silently meaningless average); another probe or
    iteration count ran a different number of collectives (a hang at the end); other targets or
    another ablation plan added up unrelated numbers."""
    first, second = _run(tmp_path, "settings")
    for name, setting in _worker().MISMATCHED:
        for outcome in (first[(name, setting)], second[(name, setting)]):
            assert outcome[:2] == ("error", "ValueError"), (name, setting, outcome)
            assert "the processes passed different settings" in outcome[2], (name, setting, outcome)
            assert f"{setting}: process 0 " in outcome[2], (name, setting, outcome)

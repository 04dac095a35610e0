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


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Each process's outcomes of the "refused" split (one run for the tests below)."""
    return _run(tmp_path_factory.mktemp("refused"), "refused")


@pytest.mark.parametrize("case, refusal", [
    ("merged", "ablation_scores: LoRA layer(s) ['2'] are merged into their base weight"),
    ("disabled", "ablation_scores: the adapters of LoRA layer(s) ['0', '2'] are disabled"),
])
def test_a_model_one_process_refuses_is_an_error_on_both(refused, case, refusal):
    """Process 1's model has a merged layer (or its adapters disabled): it raises its refusal, and
    process 0 a RuntimeError naming it, before any evaluation. Process 1 used to hold its refusal
    back and score on, silently (zeros for the merged layer), and process 0 with it."""
    first, second = refused
    assert second[case][:2] == ("error", "RuntimeError"), second[case]
    assert refusal in second[case][2], second[case]
    assert first[case][:2] == ("error", "RuntimeError"), first[case]
    assert f"ablation_scores failed on another process (process 1: RuntimeError: {refusal}" in first[case][2], \
        first[case]


def test_both_processes_score_again_after_a_refusal(refused):
    """Then, on both models as they were: the scores on the union of the batches."""
    worker = _worker()
    model, batches = worker.setup()
    want = worker._ablation(model, batches, 0)
    first, second = refused
    assert first["again"][0] == second["again"][0] == "ok", (first["again"], second["again"])
    _assert_close(first["again"][1], want, "process 0")
    for name, (removed, alone) in first["again"][1].items():
        assert torch.equal(second["again"][1][name][0], removed) and torch.equal(second["again"][1][name][1], alone)

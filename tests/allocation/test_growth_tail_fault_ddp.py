"""Out of memory on one gloo process in a growth's local step after its one collective (the
ratio from the reduced sums; the last step, the copy of the aligned directions into the new rows
of A): every process raises, and every process takes the growth back, so all keep the ranks,
pools, gradients and optimizer state they had before the decision and decide again as a run that
never failed. A failed copy used to be taken back by the failing process alone while the others
kept the growth, and the replicas' ranks parted; a failed ratio left the others waiting."""

from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes

WORKER = Path(__file__).with_name("ddp_growth_tail_fault_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

INJECTED = "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (injected)"


@pytest.fixture(scope="module", params=["ratio", "copy"])
def outcomes(request, tmp_path_factory):
    return run_two_processes(WORKER, tmp_path_factory.mktemp(request.param), request.param, timeout=60)


def _assert_same(got, want, what):
    assert got["pools"].keys() == want["pools"].keys(), what
    for name, (rank, a, b) in want["pools"].items():
        assert got["pools"][name][0] == rank, (what, name)
        assert torch.equal(got["pools"][name][1], a) and torch.equal(got["pools"][name][2], b), (what, name)
    assert got["grads"].keys() == want["grads"].keys(), what
    for name, grad in want["grads"].items():
        assert torch.equal(got["grads"][name], grad), (what, name)
    assert got["state"].keys() == want["state"].keys(), what
    for name, state in want["state"].items():
        assert got["state"][name].keys() == state.keys(), (what, name)
        for key, value in state.items():
            assert torch.equal(got["state"][name][key], value), (what, name, key)


def test_every_process_raises(outcomes):
    first, second = outcomes
    assert second["injected"] and not first["injected"]
    assert second["outcome"][:3] == ("error", "OutOfMemoryError", INJECTED.split(": ", 1)[1]), second["outcome"]
    assert first["outcome"][:2] == ("error", "RuntimeError"), first["outcome"]
    assert f"update_ranks failed on another process (process 1: {INJECTED})" in first["outcome"][2]


def test_every_process_takes_the_growth_back(outcomes):
    """The first growth failed: every layer is as before the decision, on both processes."""
    for rank, result in enumerate(outcomes):
        _assert_same(result["after"], result["before"], f"process {rank}")
        for name, (r, a, b) in result["after"]["pools"].items():
            assert not a[r:].any() and not b[:, r:].any(), (rank, name)  # free slots zero
    _assert_same(outcomes[1]["after"], outcomes[0]["after"], "process 1 against process 0")


def test_a_retry_decides_as_an_uninterrupted_run(outcomes):
    for rank, result in enumerate(outcomes):
        assert result["retry"][0] == "ok" and result["retry"][1], (rank, result["retry"])
        assert result["retry"] == result["reference"], rank
        _assert_same(result["retried"], result["uninterrupted"], f"process {rank}")
    _assert_same(outcomes[1]["retried"], outcomes[0]["retried"], "process 1 against process 0")

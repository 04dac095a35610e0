"""Under DDP every process builds the pools LoRAMBoOptimizer.compute_optimal_ranks decides, so
every process must decide the same ranks. Scores computed on each process (an SVD, an einsum, a
sum) can differ in their last bits between machines; every process takes process 0's, so
process 1 (given rounding-level different numbers) builds pools of the same shapes."""

from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes
from twin_layers import BUDGET, batches, loss_fn, twin

WORKER = Path(__file__).with_name("ddp_allocator_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def single_process(method, allocation, nudged):
    from lorambo.optimizer import LoRAMBoOptimizer

    opt = LoRAMBoOptimizer(twin(nudged), BUDGET, sensitivity_method=method, allocation=allocation)
    return opt.compute_optimal_ranks(batches(), loss_fn), opt.sensitivities


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_two_processes(WORKER, tmp_path_factory.mktemp("allocator"), timeout=60)


@pytest.mark.parametrize("method, allocation", [("frobenius", "closed_form"), ("data", "closed_form"),
                                                ("frobenius", "frobenius_greedy"), ("data", "data_weighted"),
                                                ("gradient", "closed_form")])
def test_every_process_takes_process_0s_ranks(outcomes, method, allocation):
    ranks, sens = single_process(method, allocation, nudged=False)
    if method != "gradient":  # the nudge alone flips the decision (the gradient's is nudged in the worker)
        assert single_process(method, allocation, nudged=True)[0] != ranks
    first, second = (got[method, allocation] for got in outcomes)
    assert first[0] == "ok" and second[0] == "ok", (first, second)
    assert first[1][0] == second[1][0] == ranks == {"a": 2, "b": 1}
    assert first[1][1] == second[1][1]  # process 0's sensitivities, bit for bit
    assert first[1][1] == pytest.approx(sens, rel=1e-12)
    assert first[1][2] == second[1][2]  # and the same pools


def test_an_allocation_refused_on_one_process_is_raised_on_both(outcomes):
    first, second = (got["bad"] for got in outcomes)
    assert second[:2] == ("error", "ValueError") and "'b'" in second[2], second
    assert first[:2] == ("error", "RuntimeError"), first
    assert "process 1: ValueError" in first[2] and "compute_optimal_ranks" in first[2]

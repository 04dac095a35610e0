"""Worker for test_allocator_ddp.py: python ddp_allocator_worker.py RANK WORLD STORE_FILE OUT_FILE.

Two gloo processes run LoRAMBoOptimizer.compute_optimal_ranks on the same batches while process
1 sees rounding-level different numbers (twin_layers.py): its layer ``b`` weight nudged for the
sensitivities read from weights and for the curves, its gradient sensitivity of ``b`` nudged
for "gradient". Then process 1 alone passes a negative sensitivity. Each outcome is saved.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import lorambo.sensitivity
from lorambo.optimizer import LoRAMBoOptimizer

from gloo_workers import attempt  # tests/ is on the PYTHONPATH run_two_processes gives
from twin_layers import BUDGET, NUDGE, batches, loss_fn, twin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from rendezvous import exit_skipping_teardown  # noqa: E402

CASES = [("frobenius", "closed_form"), ("data", "closed_form"), ("frobenius", "frobenius_greedy"),
         ("data", "data_weighted"), ("gradient", "closed_form")]


def main(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if rank == 1:
        exact = lorambo.sensitivity.gradient_sensitivity

        def nudged(*args, **kwargs):
            return {n: v * NUDGE if n == "b" else v for n, v in exact(*args, **kwargs).items()}

        lorambo.sensitivity.gradient_sensitivity = nudged
    result = {}
    for method, allocation in CASES:
        opt = LoRAMBoOptimizer(twin(nudged=rank == 1 and method != "gradient"), BUDGET,
                               sensitivity_method=method, allocation=allocation)
        result[method, allocation] = attempt(lambda: (opt.compute_optimal_ranks(batches(), loss_fn),
                                                      opt.sensitivities, opt.capacities))
    opt = LoRAMBoOptimizer(twin(), BUDGET, sensitivity_method="frobenius")
    bad = {"a": 1.0, "b": -1.0 if rank == 1 else 1.0}
    result["bad"] = attempt(lambda: opt.compute_optimal_ranks(sensitivities=bad))
    dist.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit

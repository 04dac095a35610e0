"""Worker for test_distributed_routed.py: python routed_worker.py RANK WORLD STORE_FILE OUT_FILE.

A model with two routed experts; each process's batches go through one expert only, so each
process runs a different subset of the targeted layers. ``compute(*setup())`` without
torch.distributed is the single-process reference on all batches.
"""

import sys
import warnings
from pathlib import Path

import torch

from lorambo.optimizer import LoRAMBoOptimizer
from lorambo.sensitivity import FisherProxy, data_covariance, gradient_sensitivity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from rendezvous import exit_skipping_teardown  # noqa: E402
from routed_model import Routed  # noqa: E402

DT = torch.float64


def setup():
    torch.manual_seed(0)
    model = Routed()
    g = torch.Generator().manual_seed(1)
    # (rows, expert): process 0 gets the first two batches (expert 0), process 1 the last (expert 1)
    batches = [(torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT), e)
               for n, e in ((5, 0), (3, 0), (4, 1))]
    return model, batches


def shard(batches, rank):
    return batches[:2] if rank == 0 else batches[2:]


def loss_fn(model, batch):
    x, y, expert = batch
    return ((model(x, expert) - y) ** 2).mean()


def compute(model, batches):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is reached on the union of the batches
        with FisherProxy(model, modules=["inp", "e0", "e1"]) as fisher:
            for batch in batches:
                loss_fn(model, batch).backward()
        estimates = fisher.estimates()
    return {"fisher": {n: (e.value, e.stderr, e.num_probes) for n, e in estimates.items()},
            "data": data_covariance(model, loss_fn, batches, modules=["inp", "e0", "e1"]),
            "gradient": gradient_sensitivity(model, loss_fn, batches, modules=["inp", "e0", "e1"])}


def allocator_sensitivities(model, batches):
    """What LoRAMBoOptimizer measures; it drops the targets no batch reaches."""
    allocator = LoRAMBoOptimizer(model, 200, sensitivity_method="gradient", target_modules=["inp", "e0", "e1"])
    return allocator.compute_sensitivities(batches, loss_fn)


def main(rank, world, store, out):
    torch.set_num_threads(1)
    model, batches = setup()
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = compute(model, shard(batches, rank))
        result["allocator"] = allocator_sensitivities(model, shard(batches, rank))
    finally:
        torch.distributed.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit

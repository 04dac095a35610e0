"""Worker for test_distributed.py: python dist_worker.py RANK WORLD STORE_FILE OUT_FILE.

WORLD=0 computes the single-process reference on all batches without torch.distributed.
"""

import sys
from pathlib import Path

import torch
from torch import nn

from lorambo.sensitivity import (data_covariance, gradient_sensitivity, hessian_opnorm,
                                 hessian_trace)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from rendezvous import exit_skipping_teardown  # noqa: E402

DT = torch.float64


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 3, dtype=DT))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 4, generator=g, dtype=DT), torch.randn(5, 3, generator=g, dtype=DT))
               for _ in range(4)]
    return model, batches


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def compute(model, batches):
    return {
        "hutchinson": hessian_trace(model, loss_fn, batches, num_probes=12, probes_per_pass=4),
        "xtrace": hessian_trace(model, loss_fn, batches, num_probes=8, method="xtrace"),
        "opnorm": hessian_opnorm(model, loss_fn, batches, num_iters=10),
        "gradient": gradient_sensitivity(model, loss_fn, batches),
        "data": data_covariance(model, loss_fn, batches),
    }


def main(rank, world, store, out):
    torch.set_num_threads(1)
    model, batches = setup()
    if world:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}",
                                             rank=rank, world_size=world)
        batches = batches[rank::world]
    result = compute(model, batches)
    if world:
        torch.distributed.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit

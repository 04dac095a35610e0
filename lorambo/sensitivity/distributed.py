"""The one place that talks to torch.distributed: summing statistics over ranks.

Every estimator reduces *sums* (per-probe quadratic forms summed over batches, Hessian-vector
products summed over batches, squared gradient norms, x x^T sums) together with the *count* they
were summed over, then divides. All ranks therefore end with identical estimates: those of the
mean loss over the union of all ranks' batches. Ranks must use the same seed.
"""

from __future__ import annotations

import torch

__all__ = ["is_distributed", "all_reduce_sum", "is_main_process"]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (returns it unchanged when not distributed).

    NCCL only reduces CUDA tensors: CPU tensors are moved to the current CUDA device and back.
    """
    if not is_distributed():
        return tensor
    device = tensor.device
    work = tensor
    if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    work = work.contiguous()
    torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
    return work.to(device)

"""The one place that talks to torch.distributed: summing statistics over ranks.

Every estimator reduces *sums* (per-probe quadratic forms summed over batches, Hessian-vector
products summed over batches, squared gradient norms, x x^T sums) together with the *count* they
were summed over, then divides. All ranks therefore end with identical estimates: those of the
mean loss over the union of all ranks' batches. Ranks must use the same seed.
"""

from __future__ import annotations

import torch

__all__ = ["is_distributed", "all_reduce_sum", "all_reduce_sum_many", "is_main_process"]


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


_BUCKET_ELEMENTS = 1 << 26  # 256 MiB of fp32 per packed collective


def all_reduce_sum_many(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum every tensor over all ranks with as few collectives as possible: tensors of one dtype
    and device are packed into flat buffers of up to 2^26 elements (one collective each) and
    unpacked into new tensors. Returns the inputs unchanged when not distributed."""
    if not is_distributed():
        return list(tensors)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for idx in groups.values():
        start = 0
        while start < len(idx):
            stop, size = start + 1, tensors[idx[start]].numel()
            while stop < len(idx) and size + tensors[idx[stop]].numel() <= _BUCKET_ELEMENTS:
                size += tensors[idx[stop]].numel()
                stop += 1
            chunk = idx[start:stop]
            packed = all_reduce_sum(torch.cat([tensors[i].reshape(-1) for i in chunk]))
            pos = 0
            for i in chunk:
                out[i] = packed[pos:pos + tensors[i].numel()].view(tensors[i].shape)
                pos += tensors[i].numel()
            start = stop
    return out

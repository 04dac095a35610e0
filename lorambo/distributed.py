"""Every collective lorambo takes over torch.distributed, and nothing else (the bottom floor: it
imports nothing from lorambo; see docs/architecture.md).

Two uses, one module:

- Sensitivity estimators reduce *sums* (per-probe quadratic forms, Hessian-vector products,
  squared gradient norms, x x^T sums) together with the *count* they were summed over, then
  divide, so every process ends with the estimate of the mean loss over the union of all
  processes' batches (processes must use the same seed).
- Online rank decisions change parameters (which slots are active, how new rows of A are
  initialised), and under DDP every replica must stay bitwise identical, so every process must
  take *the same* decision from *the same* numbers: statistics are summed or averaged over
  processes; the few small results a decision is taken from (singular values and vectors) are then
  broadcast from process 0 with :func:`broadcast_`, which removes any last-bit difference that
  floating-point reductions or LAPACK threading could leave; random numbers come from
  :func:`decision_generator`, never from the global RNG state, which differs across processes.

Naming states the semantics: a trailing underscore (``all_reduce_sum_``, ``broadcast_``) writes
the result into the argument and returns it; ``all_reduced_*`` returns the result and leaves the
argument untouched (the result is the argument itself when there is only one process, so do not
modify it unless you own the argument). Every function is a no-op without an initialised process
group. NCCL only talks CUDA: CPU tensors travel through the current CUDA device and come back.
"""

from __future__ import annotations

import hashlib
import pickle
import zlib

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "process_rank", "is_main_process", "all_reduce_sum_",
           "all_reduced_sum", "all_reduced_mean", "all_reduced_sums", "broadcast_",
           "decision_generator", "check_identical"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def process_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return process_rank() == 0


def _comm_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when the backend can use it in place, else a contiguous copy it can use."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor.contiguous()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` with its sum over processes and return it."""
    if not is_distributed():
        return tensor
    work = _comm_tensor(tensor)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduced_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over processes, on ``tensor``'s device; ``tensor`` is left untouched."""
    if not is_distributed():
        return tensor
    work = _comm_tensor(tensor)
    if work is tensor:
        work = tensor.clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduced_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over processes (the statistic of the DDP-averaged gradient);
    ``tensor`` is left untouched."""
    if not is_distributed():
        return tensor
    return all_reduced_sum(tensor) / world_size()


_BUCKET_ELEMENTS = 1 << 26  # 256 MiB of fp32 per packed collective


def all_reduced_sums(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sum over processes of every tensor, with as few collectives as possible: tensors of one
    dtype and device are packed into flat buffers of up to 2^26 elements (one collective each) and
    unpacked into new tensors. The inputs are left untouched (and returned when alone)."""
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
            packed = all_reduce_sum_(torch.cat([tensors[i].reshape(-1) for i in chunk]))
            pos = 0
            for i in chunk:
                out[i] = packed[pos:pos + tensors[i].numel()].view(tensors[i].shape)
                pos += tensors[i].numel()
            start = stop
    return out


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with process ``src``'s copy and return it."""
    if not is_distributed():
        return tensor
    work = _comm_tensor(tensor)
    dist.broadcast(work, src=src)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def decision_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)`` by CRC32 of their repr: stable across
    processes and Python runs (``hash()`` of a str is salted per process)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(zlib.crc32(repr((int(seed),) + tuple(keys)).encode()))
    return g


def check_identical(obj, what: str = "decisions") -> None:
    """Raise RuntimeError when processes disagree on ``obj`` (compared by a digest of its pickle).

    A debugging guard: if it ever fires, some decision input was not reduced or broadcast.
    """
    if not is_distributed():
        return
    digest = hashlib.sha256(pickle.dumps(obj)).hexdigest()
    digests = [None] * world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP processes took different {what}: digests per process {digests}")

"""What online rank decisions need from torch.distributed (DDP), and nothing else.

Why: under DDP every process holds a replica whose parameters must stay bitwise identical. A rank
decision changes parameters (which slots are active, how new rows of A are initialised), so every
process must take *the same* decision and draw *the same* numbers:

- statistics (matrix-free gradient products, ablation losses) are summed over processes with
  :func:`all_reduce_sum` / :func:`all_reduce_mean`, so each one sees the global statistic;
- the few small results a decision is taken from (singular values, singular vectors) are then
  broadcast from process 0 with :func:`broadcast_`, which removes any last-bit difference that
  floating-point reductions or LAPACK threading could leave;
- random numbers come from :func:`decision_generator`, a CPU generator seeded from stable keys
  (seed, step, layer), never from the global RNG state, which differs across processes.

Shapes never change (rank changes happen inside the pools), so DDP buckets stay valid.
Every function is a no-op without an initialised process group.
"""

from __future__ import annotations

import hashlib
import pickle
import zlib

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "process_rank", "is_main_process", "all_reduce_sum",
           "all_reduce_mean", "broadcast_", "decision_generator", "check_identical"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def process_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return process_rank() == 0


def _comm_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """NCCL only talks CUDA: move CPU tensors to the current CUDA device for the collective."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor.contiguous()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a new tensor on ``tensor``'s device; ``tensor`` itself when alone)."""
    if not is_distributed():
        return tensor
    work = _comm_tensor(tensor)
    if work is tensor:
        work = tensor.clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over processes: the statistic of the DDP-averaged gradient."""
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor) / world_size()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with process ``src``'s copy and return it."""
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

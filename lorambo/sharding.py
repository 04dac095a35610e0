"""Which part of a distributed tensor (DTensor, as FSDP2's ``fully_shard`` makes parameters)
this process holds. No collectives: only the layout rule FSDP2 uses (``torch.chunk`` along each
sharded dim), so code can read and write its own shard in place."""

from __future__ import annotations

import math

import torch

__all__ = ["is_sharded", "local_tensor", "shard_layout", "chunk_size", "local_region"]


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch without distributed tensors: nothing can be sharded
    _DTensor = None


def is_sharded(tensor) -> bool:
    """True for a DTensor."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view of its storage); any other tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_layout(tensor, who: str = "lorambo: pool edits") -> list[tuple[int, int]]:
    """``(mesh dim, tensor dim)`` of each ``Shard`` placement of a DTensor, in mesh-dim order;
    ``[]`` for any other tensor. Placements other than ``Shard`` (one per tensor dim) and
    ``Replicate`` raise NotImplementedError starting with ``who``: their local data is not a
    ``torch.chunk`` piece (``Partial`` holds summands, ``_StridedShard`` interleaved pieces)."""
    if not is_sharded(tensor):
        return []
    from torch.distributed.tensor import Replicate, Shard

    layout, seen = [], set()
    for mesh_dim, placement in enumerate(tensor.placements):
        if type(placement) is Replicate:
            continue
        if type(placement) is not Shard or placement.dim in seen:
            raise NotImplementedError(f"{who} support Shard/Replicate placements with one shard per "
                                      f"tensor dim, got {tensor.placements}")
        seen.add(placement.dim)
        layout.append((mesh_dim, placement.dim))
    return layout


def chunk_size(n: int, parts: int) -> int:
    """The length of ``torch.chunk``'s pieces of ``n`` elements in ``parts`` (the last non-empty
    one may be shorter, the ones after it empty)."""
    return math.ceil(n / parts) if n else 0


def local_region(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The global index region this process holds: the whole tensor unless it is a DTensor with
    ``Shard`` placements, then ``torch.chunk``'s layout along each sharded dim."""
    region = [slice(0, n) for n in tensor.shape]
    for mesh_dim, d in shard_layout(tensor):
        mesh = tensor.device_mesh
        n, chunk = tensor.shape[d], chunk_size(tensor.shape[d], mesh.size(mesh_dim))
        start = min(mesh.get_local_rank(mesh_dim) * chunk, n)
        region[d] = slice(start, min(start + chunk, n))
    return tuple(region)

"""Which part of a distributed tensor (DTensor, as FSDP2's ``fully_shard`` makes parameters)
this process holds. No collectives: only the layout rule FSDP2 uses (``torch.chunk`` along each
sharded dim), so code can read and write its own shard in place."""

from __future__ import annotations

import math

import torch

__all__ = ["is_sharded", "local_tensor", "local_region"]


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


def local_region(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The global index region this process holds: the whole tensor unless it is a DTensor with
    ``Shard`` placements, then ``torch.chunk``'s layout along each sharded dim."""
    region = [slice(0, n) for n in tensor.shape]
    if not is_sharded(tensor):
        return tuple(region)
    from torch.distributed.tensor import Replicate, Shard

    mesh = tensor.device_mesh
    seen = set()
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard) or placement.dim in seen:
            raise NotImplementedError(f"lorambo: pool edits support Shard/Replicate placements with one "
                                      f"shard per tensor dim, got {tensor.placements}")
        seen.add(placement.dim)
        d, parts = placement.dim, mesh.size(mesh_dim)
        coord = mesh.get_local_rank(mesh_dim)
        n = tensor.shape[d]
        chunk = math.ceil(n / parts) if n else 0
        start = min(coord * chunk, n)
        region[d] = slice(start, min(start + chunk, n))
    return tuple(region)

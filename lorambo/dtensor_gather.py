"""All-gathers of DTensors (FSDP2's parameters, gradients, optimizer state) into buffers
allocated before the first collective.

Why: ``DTensor.full_tensor()`` allocates its output inside the collective, so a process that
runs out of memory there raises while the others wait in the all-gather until the process
group's timeout. :func:`prepare_gather` allocates everything a gather writes (the full output,
and where a piece is shorter or not laid out for sending, a padded staging buffer) and checks
the placements; callers prepare every gather inside a :class:`lorambo.distributed.SharedFailure`
context, so an error there is raised on every process before any collective.
:meth:`PreparedGather.run` then only copies and all-gathers.

How: one all-gather per sharded mesh dim, over that mesh dim's process group, of equal-size
pieces (``torch.chunk``'s piece length along the sharded dim, the short piece padded; gloo and
NCCL both take this). ``torch.chunk`` pieces lie at multiples of the piece length, so the first
``n`` rows of the gathered buffer are the full tensor along that dim, padding only after them.
Replicated mesh dims need no collective. The result equals ``full_tensor()`` bit for bit (a
copy, no arithmetic). Placements are those of :func:`lorambo.sharding.shard_layout`.

What a collective may still allocate itself (NCCL's internal workspace, a backend's copy of a
tensor it cannot use in place) is outside these buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lorambo.distributed import SharedFailure
from lorambo.sharding import chunk_size, is_sharded, shard_layout

__all__ = ["PreparedGather", "prepare_gather", "prepare_gathers"]

# the same collective: torch 2.13 deprecates all_gather_into_tensor (with a warning) for
# all_gather_single, which older torch may lack
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class _Step:
    """One all-gather along one sharded mesh dim: ``recv`` holds ``parts`` pieces of ``chunk``
    rows (the sharded dim moved to the front); ``send`` is None where the piece itself is sent."""
    group: object
    dim: int
    piece: int  # rows this process holds along ``dim`` before the step
    full: int  # rows along ``dim`` after it
    send: torch.Tensor | None
    recv: torch.Tensor


class PreparedGather:
    """The all-gather of one DTensor with every buffer allocated; :meth:`run` fills them."""

    def __init__(self, tensor, who: str):
        layout = shard_layout(tensor, who=f"{who}: gathers")
        local = tensor.to_local().detach()  # the shard's storage, without an autograd view of it
        mesh = tensor.device_mesh
        self._local, self._steps = local, []
        current = local  # a view of what the steps before hold, made before any data is there
        for mesh_dim, dim in layout:
            parts = mesh.size(mesh_dim)
            if parts == 1:  # this mesh dim holds the whole tensor dim already
                continue
            full, piece = tensor.shape[dim], current.shape[dim]
            chunk = chunk_size(full, parts)
            moved = current.movedim(dim, 0)
            rest = list(moved.shape[1:])
            direct = piece == chunk and moved.is_contiguous()
            send = None if direct else torch.empty([chunk] + rest, dtype=local.dtype, device=local.device)
            recv = torch.empty([parts * chunk] + rest, dtype=local.dtype, device=local.device)
            self._steps.append(_Step(mesh.get_group(mesh_dim), dim, piece, full, send, recv))
            current = recv[:full].movedim(0, dim)
        # the last step's buffer is the output where it is laid out as the full tensor is
        self._copy_out = not (self._steps and current.is_contiguous())
        self._output = torch.empty(tuple(tensor.shape), dtype=local.dtype, device=local.device) \
            if self._copy_out else current

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        """The full tensor (a contiguous tensor of its own, never the DTensor's storage); every
        process of the DTensor's mesh must run the same gathers in the same order."""
        if self._steps is None:
            raise RuntimeError("lorambo.dtensor_gather: PreparedGather.run called twice")
        current = self._local
        for step in self._steps:
            moved = current.movedim(step.dim, 0)
            if step.send is not None:
                step.send[:step.piece].copy_(moved)
            if step.recv.numel():  # an empty dim: nothing to send, on every process alike
                _all_gather_single(step.recv, moved if step.send is None else step.send, group=step.group)
            current = step.recv[:step.full].movedim(0, step.dim)
        if self._copy_out:
            self._output.copy_(current)
        output, self._output, self._steps, self._local = self._output, None, None, None  # staging freed
        return output


def prepare_gather(tensor, who: str) -> PreparedGather:
    """Check ``tensor``'s placements and allocate its all-gather's buffers (raises here, out of
    memory included, before any collective); ``who`` names the caller in errors."""
    if not is_sharded(tensor):
        raise TypeError(f"{who}: prepare_gather takes a DTensor, got a {type(tensor).__name__}")
    return PreparedGather(tensor, who)


def prepare_gathers(tensors: Mapping[Any, Any], who: str, settings: Any = None) -> dict[Any, PreparedGather]:
    """:func:`prepare_gather` of every DTensor in ``tensors`` (same keys), then one small
    all-reduce (:class:`lorambo.distributed.SharedFailure`, which also compares ``settings``):
    an error on one process, out of memory included, raises on every process before any
    all-gather. Every process must call it with the same tensors."""
    failure = SharedFailure(who, settings=settings)
    with failure:
        gathers = {key: prepare_gather(tensor, who) for key, tensor in tensors.items()}
    failure.check()
    return gathers

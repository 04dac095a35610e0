"""Whether two tensors share memory: what makes a weight tied.

Tied weights are usually one Parameter held by two modules, but they need not be: loading a
``torch.save`` of a tied model's state_dict with ``load_state_dict(assign=True)`` gives each
module its own Parameter over the same storage. A merge writes into the memory, so both count.
Meta tensors (no memory) and DTensor shards are compared by identity only.
"""

from __future__ import annotations

import torch

from lorambo.sharding import is_sharded

__all__ = ["memory_key", "memory_span", "share_memory"]


def _storage_address(tensor) -> int | None:
    """The address of the storage of a strided tensor with memory of its own to compare; None
    for the rest (see :func:`memory_span`)."""
    # is_meta, not device.type: this runs for every parameter of a model (configure_model's tied
    # weight scan), and building a torch.device costs five times the test
    if not isinstance(tensor, torch.Tensor) or tensor.is_meta or is_sharded(tensor):
        return None
    if tensor.layout != torch.strided or not tensor.numel():
        return None
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage
        return None


def memory_span(tensor) -> tuple[int, int, int] | None:
    """``(storage address, first byte, end byte)`` of the memory a strided tensor covers; None for
    one without memory of its own to compare (meta, sharded, sparse, empty), or no tensor at all
    (a swapped base layer's ``weight`` may be a method)."""
    address = _storage_address(tensor)
    if address is None:
        return None
    size = tensor.element_size()
    first = tensor.storage_offset() * size
    extent = 1
    for n, s in zip(tensor.shape, tensor.stride()):
        extent += (n - 1) * s
    return address, first, first + extent * size


def share_memory(a, b) -> bool:
    """``a`` and ``b`` are the same tensor or cover overlapping bytes of one storage."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a is b:
        return True
    sa, sb = memory_span(a), memory_span(b)
    return sa is not None and sb is not None and sa[0] == sb[0] and sa[1] < sb[2] and sb[1] < sa[2]


def memory_key(tensor) -> tuple:
    """Equal for tensors that may share memory (the same storage, or the same tensor where there
    is none to compare): group by it, then check with :func:`share_memory`."""
    address = _storage_address(tensor)  # the span's extent is not needed to group
    return ("storage", address) if address is not None else ("tensor", id(tensor))

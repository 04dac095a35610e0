"""Python entry points for the compiled multi-tensor ops (``torch.ops.lorambo``, csrc/).

Every function needs the compiled extension: without it they raise the RuntimeError of
:func:`lorambo.ext.loader.require` (check :func:`available` first to choose another path).

Ops (all one parallel loop on the CPU, one launch on CUDA, over the whole list):

- :func:`multi_dot` / :func:`multi_sq_norm`: per-pair dot products / per-tensor squared norms of
  lists of any shapes and dtypes (float32, float64, bfloat16, float16), float32 accumulation,
  float64 results. With ``rows=P`` tensors of shape (P, ...) reduce per row: a (P, L) result,
  the layout of :func:`lorambo.sensitivity.reductions.per_layer_dots`.
- :func:`pool_remap_`: compact, permute or zero rank slots of many pools (and their optimizer
  moments) in one call; :func:`remap_pools_` applies it to LoRAMBoLinear layers.

``pool_adamw_`` (slot-aware AdamW over many pools) and ``scalars_add_`` (its per-parameter step
counts, CPU only) are called by :mod:`lorambo.optim.adamw`. ``zero_views_`` (CPU only) zeroes the inactive
slots after optimizer steps (:mod:`lorambo.nn.inactive_slots`).

Bad input raises a RuntimeError from C++ naming the list, the index and the value. The
extension's other ops are called through ``torch.ops.lorambo`` where they are used: the LoRA
linear op and its dropout mask by :mod:`lorambo.ops.ext_linear`; ``probe_fill_`` (Philox probes,
csrc/include/lorambo/philox.h) by no lorambo code, only by benchmarks/bench_ext.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from lorambo.ext import loader as ext_loader

__all__ = [
    "available",
    "keep_map",
    "multi_dot",
    "multi_sq_norm",
    "pool_remap_",
    "pool_slot_tensors",
    "remap_pools_",
    "slot_state_tensors",
    "state_tensors",
]


def available() -> bool:
    """Whether the compiled ops can run (warns once if the extension is present but broken)."""
    return ext_loader.load() is not None


def _ops():
    ext_loader.require()
    return torch.ops.lorambo


def _rows_empty(rows: int, like: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.zeros((rows, 0), dtype=torch.float64)


# ------------------------------------------------------------------------------ reductions
def multi_dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], rows: int = 1) -> torch.Tensor:
    """float64 (rows, L): entry (p, i) = <row p of xs[i], row p of ys[i]>; rows=1 is a plain dot."""
    ops = _ops()
    if len(xs) == 0 and len(ys) == 0:
        return _rows_empty(rows, xs)
    return ops.multi_dot(list(xs), list(ys), rows)


def multi_sq_norm(xs: Sequence[torch.Tensor], rows: int = 1) -> torch.Tensor:
    """float64 (rows, L): squared Frobenius norm of row p of xs[i]."""
    ops = _ops()
    if len(xs) == 0:
        return _rows_empty(rows, xs)
    return ops.multi_sq_norm(list(xs), rows)


# ------------------------------------------------------------------------ pool maintenance
def pool_remap_(tensors: Sequence[torch.Tensor], slot_dims: Sequence[int],
                maps: Sequence[torch.Tensor | Sequence[int]]) -> None:
    """In place, for every i: slot j of ``tensors[i]`` along ``slot_dims[i]`` takes the old slot
    ``maps[i][j]``, or zeros where ``maps[i][j] == -1``. Slots with ``maps[i][j] == j`` are not touched.

    One call covers any number of pools and their optimizer moments; ``maps`` may repeat one
    tensor for several entries. Tensors must be contiguous and distinct.
    """
    ops = _ops()
    maps = [m if torch.is_tensor(m) else torch.as_tensor(list(m), dtype=torch.long) for m in maps]
    if tensors or slot_dims or maps:
        ops.pool_remap_(list(tensors), [int(d) for d in slot_dims], maps)


def keep_map(keep: Sequence[int], old_rank: int, capacity: int) -> torch.Tensor:
    """Map for ``LoRAMBoLinear.keep_components``: slots 0..n-1 take ``keep``, n..old_rank-1 become 0."""
    src = list(range(capacity))
    for j, k in enumerate(keep):
        src[j] = int(k)
    for j in range(len(keep), old_rank):
        src[j] = -1
    return torch.tensor(src, dtype=torch.long)


def state_tensors(optimizer, param) -> list[torch.Tensor]:
    """The per-element optimizer state tensors of ``param`` (the shapes pool_remap_ edits)."""
    state = optimizer.state.get(param) if optimizer is not None else None
    if not state:
        return []
    return [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]


def slot_state_tensors(optimizer, param, slot_dim: int) -> list[tuple[torch.Tensor, int]]:
    """``(tensor, dim)`` for the per-slot optimizer state of a pool ``param`` that is not
    per-element: one entry per slot along ``dim`` and size 1 elsewhere. That is 1-D ``[capacity]``
    (lorambo.optim.AdamW's step counts, dim 0), or a factored second moment with the param's
    number of dims, ``capacity`` along ``slot_dim`` and 1 along the others (torch.optim.Adafactor's
    ``row_var`` of ``lora_A`` and ``col_var`` of ``lora_B``). Statistics shared by all slots (the
    other factor) have size 1 along ``slot_dim`` and are left alone."""
    state = optimizer.state.get(param) if optimizer is not None else None
    if not state:
        return []
    slots, out = param.shape[slot_dim], []
    for value in state.values():
        if not torch.is_tensor(value) or value.shape == param.shape:
            continue
        if value.dim() == 1 and value.shape[0] == slots:
            out.append((value, 0))
        elif value.dim() == param.dim() and value.shape[slot_dim] == slots and \
                all(n == 1 for d, n in enumerate(value.shape) if d != slot_dim):
            out.append((value, slot_dim))
    return out


@torch.no_grad()
def remap_pools_(entries: Iterable[tuple[torch.nn.Module, torch.Tensor]], optimizer=None,
                 state_maps: Iterable[torch.Tensor] | None = None) -> None:
    """Apply slot maps to many LoRAMBoLinear pools in one launch.

    ``entries``: (layer, map) pairs; the map (length capacity) is applied to ``lora_A`` (slot =
    row) and ``lora_B`` (slot = column), and, with ``optimizer``, to every per-element state
    tensor of those parameters (Adam's exp_avg / exp_avg_sq, ...). ``state_maps`` (one per entry)
    overrides the map used for the optimizer state, e.g. an identity map with -1 at the slots
    whose parameters are re-initialised elsewhere but whose moments must be zeroed. Gradients (``.grad``) follow
    the parameter map; per-slot step counts (:class:`lorambo.optim.AdamW`) follow the state map.
    The layers' ``rank`` bookkeeping is the caller's job.
    """
    entries = list(entries)
    state_maps = list(state_maps) if state_maps is not None else [m for _, m in entries]
    if len(state_maps) != len(entries):
        raise ValueError(f"remap_pools_: {len(entries)} entries but {len(state_maps)} state maps")
    tensors, dims, maps = [], [], []
    for (layer, m), sm in zip(entries, state_maps):
        for tensor, dim, is_state in pool_slot_tensors(layer, optimizer):
            tensors.append(tensor)
            dims.append(dim)
            maps.append(sm if is_state else m)
    pool_remap_(tensors, dims, maps)


def pool_slot_tensors(layer, optimizer=None):
    """``(tensor, slot_dim, is_optimizer_state)`` for everything that belongs to a layer's slots:
    the pools, their gradients, per-element optimizer state and per-slot state (step counts,
    factored second moments). ``optimizer`` may be a tuple of optimizers (several that step the
    pools: each holds its own state for the parameters it steps)."""
    optimizers = optimizer if isinstance(optimizer, tuple) else (optimizer,)
    for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        yield param.data, dim, False
        if param.grad is not None:  # a gradient belongs to its slot, like the value
            yield param.grad, dim, False
        for one in optimizers:
            for value in state_tensors(one, param):
                yield value, dim, True
            for value, value_dim in slot_state_tensors(one, param, dim):
                yield value, value_dim, True

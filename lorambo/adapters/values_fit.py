"""Refuse adapter values that the dtype they are copied into cannot hold.

(A layer's scaling and dropout are checked against its compute dtype by
lorambo/nn/settings_fit.py.)

A float32 (or float64) adapter loaded into a float16 model: values beyond 65504 round to inf in
the pools, and the model computes inf/NaN from then on. ``load_adapter`` and ``import_peft`` check
every LoRA tensor and every parameter of a module to save against the dtype it lands in, before
they change anything. Rounding within the range (a float32 adapter in a bfloat16 model) is the
usual cast, one rounding per value, and is not refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["check_fits_dtypes", "destination_dtype", "loaded_entries", "saved_state_entries"]


def destination_dtype(model: nn.Module, layer: str, pool: str) -> torch.dtype:
    """The dtype ``pool`` (``lora_A`` / ``lora_B``) of layer ``layer`` has, or will have once a
    bare Linear/Conv1D there is configured (pools take the base weight's dtype)."""
    module = model.get_submodule(layer)
    held = getattr(module, pool, None)
    return held.dtype if isinstance(held, torch.Tensor) else module.weight.dtype


def saved_state_entries(model: nn.Module, states: dict[str, dict[str, torch.Tensor]]):
    """``(what, value, dtype)`` for every floating parameter a module to save loads, ``dtype`` the
    model's. Buffers are left out: they may hold inf on purpose (masks)."""
    for name, state in states.items():
        module = model.get_submodule(name)
        params = dict(module.named_parameters())
        for key, value in state.items():
            if key in params and value.is_floating_point():
                yield f"module to save {name!r}: parameter {key!r}", value, params[key].dtype


def loaded_entries(model: nn.Module, pools: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   states: dict[str, dict[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor, torch.dtype]]:
    """``(what, value, dtype)`` for every value a load copies into ``model``: the ``(lora_A,
    lora_B)`` of each layer in ``pools`` and the floating parameters of each module to save in
    ``states``, ``dtype`` the one each lands in."""
    for name, (a, b) in pools.items():
        for pool, value in (("lora_A", a), ("lora_B", b)):
            yield f"layer {name!r}: {pool}", value, destination_dtype(model, name, pool)
    yield from saved_state_entries(model, states)


def check_fits_dtypes(where: str, entries: Iterable[tuple[str, torch.Tensor, torch.dtype]]) -> None:
    """ValueError naming the first ``(what, value, dtype)`` whose finite values become inf in ``dtype``."""
    for what, value, dtype in entries:
        if not dtype.is_floating_point or value.dtype == dtype:
            continue
        cast = value.detach().to(dtype)
        bad = torch.isfinite(value) & ~torch.isfinite(cast)
        count = int(bad.sum())
        if count:
            largest = float(value.detach()[bad].abs().max())
            raise ValueError(f"{where}: {what} holds {count} value(s) that the model's {dtype} cannot hold "
                             f"(largest |value| {largest:.6g}; {dtype} holds up to {torch.finfo(dtype).max:.6g}): "
                             "they would load as inf. Nothing was changed: load into a model of a wider dtype "
                             "(model.float() first)")

"""Refuse to write or import LoRA pools or modules to save that hold NaN/inf (a diverged run).

``load_adapter`` refuses a file with non-finite tensors (:mod:`lorambo.adapters.format`), and a
peft adapter with NaN computes NaN: a save from a diverged run would replace a good file, written
atomically, with one that is of no use. The writers check first and leave the old file alone.
``import_peft`` / ``from_peft`` check the peft weights they import the same way, before they
change the model (:func:`check_finite_values`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lorambo.adapters.extra_modules import non_finite_parameters

__all__ = ["check_finite_pools", "check_finite_modules_to_save", "check_finite_values"]


def check_finite_pools(who: str, pools: Iterable[tuple[str, str, torch.Tensor]]) -> None:
    """RuntimeError naming the first ``(layer name, pool name, active slice)`` that holds NaN/inf."""
    for layer, pool, values in pools:
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise RuntimeError(f"{who}: {pool} of layer {layer!r} holds {bad} NaN/inf values of {values.numel()} "
                               "(a diverged run?); nothing was written: what the path held is left as it was")


def check_finite_modules_to_save(who: str, model) -> None:
    """RuntimeError naming the first parameter of a module to save that holds NaN/inf (load refuses
    such a file, :mod:`lorambo.adapters.extra_modules`)."""
    for module, key, values in non_finite_parameters(model)[:1]:
        bad = int((~torch.isfinite(values)).sum())
        raise RuntimeError(f"{who}: parameter {key!r} of module to save {module!r} holds {bad} NaN/inf values of "
                           f"{values.numel()} (a diverged run?); nothing was written: what the path held is left "
                           "as it was")


def check_finite_values(where: str, entries: Iterable[tuple[str, torch.Tensor]]) -> None:
    """ValueError naming the first ``(what, values)`` that holds NaN/inf: imported weights,
    checked before anything is changed."""
    for what, values in entries:
        bad = int((~torch.isfinite(values.detach())).sum())
        if bad:
            raise ValueError(f"{where}: {what} holds {bad} NaN/inf value(s) of {values.numel()} (a diverged run?); "
                             "the model computes NaN/inf with them. Nothing was changed")

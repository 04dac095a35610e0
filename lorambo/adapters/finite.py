"""Refuse to write LoRA pools that hold NaN/inf (a diverged run).

``load_adapter`` refuses a file with non-finite tensors (:mod:`lorambo.adapters.format`), and a
peft adapter with NaN computes NaN: a save from a diverged run would replace a good file, written
atomically, with one that is of no use. The writers check first and leave the old file alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["check_finite_pools"]


def check_finite_pools(who: str, pools: Iterable[tuple[str, str, torch.Tensor]]) -> None:
    """RuntimeError naming the first ``(layer name, pool name, active slice)`` that holds NaN/inf."""
    for layer, pool, values in pools:
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise RuntimeError(f"{who}: {pool} of layer {layer!r} holds {bad} NaN/inf values of {values.numel()} "
                               "(a diverged run?); nothing was written: what the path held is left as it was")

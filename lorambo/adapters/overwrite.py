"""Giving layers the ranks of an adapter that is about to be copied into them.

Every slot a loader activates is overwritten with the file's values next, so initialising it
would only move torch's global random stream (the caller's dropout masks and data order) for
numbers that are thrown away. Layers are built at rank 0 (nothing to initialise) and grown with
a throwaway generator instead.
"""

from __future__ import annotations

import warnings

import torch

from lorambo.model import configure_model, lora_layers, unload
from lorambo.model.frozen_heads import FrozenHeadWarning
from lorambo.nn.frozen_growth import values_follow
from lorambo.nn.optimizer_tracking import REBUILD_IT, warn_if_state_left_behind
from lorambo.nn.slot_lineage import restart_ids

__all__ = ["set_rank_for_overwrite", "configure_for_overwrite"]


def set_rank_for_overwrite(layer, rank: int) -> int:
    """``layer.set_rank(rank)`` whose new rows of A come from a throwaway CPU generator (set_rank
    copies them to the pool's device), not from torch's global one; returns the old rank. Every
    active slot then holds a new component (``lorambo.nn.slot_lineage``), also one kept at the
    same rank: the caller overwrites them all. An optimizer that has stepped the pools keeps the
    old components' state: warned here, with the remedy that fits a load (``set_rank``'s own
    warning, once per optimizer, would say to pass an optimizer the loaders do not take)."""
    warn_if_state_left_behind(layer, None, "an adapter loaded into it replaced its components", REBUILD_IT)
    with values_follow():  # a frozen lora_B gets the saved values: its new slots are not wasted
        old = layer.set_rank(rank, generator=torch.Generator())
    restart_ids(layer)
    return old


def configure_for_overwrite(model, ranks: dict[str, int], capacity, **configure_kwargs):
    """``configure_model(model, ranks, capacity=capacity, ...)`` of a plain ``model`` without
    touching torch's global RNG; the active slots hold throwaway values until the caller copies
    its own in. Stopped part-way (Ctrl-C, out of memory), the model is plain again."""
    with warnings.catch_warnings():  # a head the adapter file does not hold was not trained with it
        warnings.simplefilter("ignore", FrozenHeadWarning)
        configure_model(model, dict.fromkeys(ranks, 0), capacity=capacity, **configure_kwargs)
    layers = lora_layers(model)
    try:
        for name, rank in ranks.items():
            set_rank_for_overwrite(layers[name], rank)
    except BaseException:
        unload(model, merge=False)
        raise
    return model

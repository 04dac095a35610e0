"""The state_dict hooks of :class:`lorambo.nn.LoRAMBoLinear`: what a saved layer holds (its
base weight unmerged, its slots' component ids) and the checks a load makes before torch copies
anything (docs/architecture.md, "The rank pool")."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lorambo.nn.optimizer_tracking import LOAD_IT, warn_if_state_left_behind
from lorambo.nn.slot_lineage import SLOT_IDS_KEY, restart_ids, slot_ids
from lorambo.nn.slots import POOL_SLOT_DIMS, used_slots
from lorambo.sharding import is_sharded

if TYPE_CHECKING:
    from lorambo.nn.lora_linear import LoRAMBoLinear


@torch.no_grad()
def unmerged_base_weight(module: "LoRAMBoLinear", state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: a merged layer stores its base weight unmerged. The pools hold the
    adapter too, and the extra state says nothing about merging, so a merged weight would be
    loaded as the base weight of an unmerged layer and the adapter counted twice. A sharded
    (FSDP2) weight is left as it is: its state_dict is taken shard by shard."""
    key = f"{prefix}base_layer.weight"
    if module.merged and key in state_dict and not is_sharded(module.base_layer.weight):
        # a copy, not the layer's kept original: a model loaded from this state_dict with
        # assign=True would otherwise hold that tensor as its weight, and merging it would
        # change what this layer's unmerge() restores
        state_dict[key] = module._unmerged_weight(copy=True)


def save_slot_ids(module: "LoRAMBoLinear", state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the ids of the components in the slots go into the module's
    metadata (lorambo/nn/slot_lineage.py), not among its tensors."""
    local_metadata[SLOT_IDS_KEY] = slot_ids(module)


def check_extra_state_first(module: "LoRAMBoLinear", state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: torch copies a module's tensors before it hands over the extra
    state, so a rank refused only in ``set_extra_state`` would leave the pools loaded under the
    old rank (non-zero slots past it). Refuse a bad one before anything is copied."""
    key = f"{prefix}_extra_state"
    if key in state_dict:
        module._parse_extra_state(state_dict[key])


def unmerge_before_load(module: "LoRAMBoLinear", state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a merged layer is unmerged before its entries load. A state_dict
    holds the unmerged weight and the pools (see above); loaded into a merged layer they would
    leave a merged flag over an unmerged weight, and the next unmerge() would subtract the new
    adapter from it."""
    if module.merged and any(key.startswith(prefix) for key in state_dict):
        if is_sharded(module.base_layer.weight) or is_sharded(module.lora_A):
            raise RuntimeError(f"{module._label} is merged and sharded (FSDP2): call "
                               "lorambo.integrations.fsdp.unmerge(model) before loading a state_dict")
        module.unmerge()


@torch.no_grad()
def cover_slots_past_rank(module: "LoRAMBoLinear", state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook for pools with non-zero slots past the rank they load under, which
    loading would zero, silently changing the function. That rank travels in ``_extra_state``.

    With it, lorambo itself never leaves a slot past the rank non-zero (docs/architecture.md, the
    rank pool), so such values were written from outside: a weight average
    (``torch.optim.swa_utils.AveragedModel``, an EMA) copied before the trained model's ranks
    changed keeps its old ranks and averages the grown slots into its inactive ones. Refused.

    Pools loaded without it keep the layer's current rank. They may be one shard of a sharded
    checkpoint whose ``_extra_state`` is in another shard (transformers'
    ``load_sharded_checkpoint``, through which Trainer resumes, loads the shards in no fixed
    order), so the rank is raised to cover the loaded non-zero slots; an extra state loaded later
    sets it exactly. (torch hands pre-hooks ``strict=True`` whatever the caller passed, so a
    filtered state_dict and a shard cannot be told apart here.)"""
    key = f"{prefix}_extra_state"
    saved = key in state_dict
    rank = module._parse_extra_state(state_dict[key])[0] if saved else module.rank
    last = 0
    for name, dim in POOL_SLOT_DIMS.items():
        value = state_dict.get(prefix + name)
        if (not isinstance(value, torch.Tensor) or is_sharded(value) or value.device.type == "meta"
                or value.shape != getattr(module, name).shape):
            continue  # nothing to check here (a shard would need a collective); torch reports shape errors
        past = used_slots(value, dim)
        if saved and past > rank:
            raise ValueError(f"{module._label}: state_dict entry {prefix + name!r} has non-zero slots up to {past} "
                             f"but its saved rank ({key!r}) is {rank}; lorambo keeps slots past the rank at zero, "
                             "so they were written outside lorambo, e.g. by a weight average (AveragedModel, "
                             "an EMA) that kept averaging after the trained model's ranks changed; loading would "
                             "drop them. Call lorambo.follow_ranks(average, model) after every rank change, or "
                             f"zero those slots in the state_dict to load the rank-{rank} adapter it computes")
        last = max(last, past)
    if not saved and last > module.rank:
        old = module.rank
        module._set_active_rank(last)
        warn_if_state_left_behind(module, None, f"rank changed {old} -> {last} by load_state_dict", LOAD_IT)
    if any(prefix + name in state_dict for name in POOL_SLOT_DIMS):
        restart_ids(module)  # new components (set_extra_state restarts them at the loaded rank)

"""Why a LoRAMBoLinear's pools are no longer the Parameters its edits write into.

Rank changes, loads and the zeroing of inactive slots edit ``lora_A`` / ``lora_B`` in place
(docs/architecture.md, the rank pool). ``torch.nn.utils.parametrize`` replaces a pool by a
tensor computed at every read, and ``torch.nn.utils.prune`` by ``orig * mask`` recomputed in a
forward pre-hook: an edit would land in that temporary and be silently lost.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from lorambo.nn.slots import POOL_SLOT_DIMS

__all__ = ["replaced_pools_reason"]


def replaced_pools_reason(layer: nn.Module) -> str | None:
    """What took the place of ``layer``'s pool Parameters and how to undo it; None when both
    are its own Parameters."""
    params = layer._parameters
    missing = [name for name in POOL_SLOT_DIMS if name not in params]
    if not missing:
        return None
    shown = f"its {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
    parametrizations = layer._modules.get("parametrizations")
    if parametrizations is not None and any(name in parametrizations for name in missing):
        what = "parametrized (torch.nn.utils.parametrize)"
        undo = (f"torch.nn.utils.parametrize.remove_parametrizations(layer, {missing[0]!r}); a parametrization of "
                "the base weight (on layer.base_layer) works")
    elif any(isinstance(hook, prune.BasePruningMethod) for hook in layer._forward_pre_hooks.values()):
        what = "pruned (torch.nn.utils.prune recomputes each from its _orig and _mask before every call)"
        undo = f"torch.nn.utils.prune.remove(layer, {missing[0]!r}), which keeps the pruned values"
    else:
        what = "no longer a Parameter of the layer (deleted, or replaced by a plain tensor)"
        undo = f"set layer.{missing[0]} to an nn.Parameter again"
    return (f"{shown} {what}, which LoRAMBoLinear does not support: rank changes edit the pools in place, and a "
            f"pool recomputed from other tensors would silently take none of them. Undo it: {undo}")

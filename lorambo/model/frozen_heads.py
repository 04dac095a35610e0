"""Warning about a classification head that configure_model leaves frozen.

The default targets leave classification heads out (their num_labels outputs cap the rank, and
peft's ``all-linear`` leaves them out too), and configure_model freezes every parameter that is
not LoRA. A head that ``from_pretrained`` has just initialised at random (a model loaded with a
new ``num_labels``) then stays random through training, and nothing says so: the loss still
falls a little, through the adapters alone. peft trains such a head through ``modules_to_save``
(its ``task_type="SEQ_CLS"`` adds it by itself); lorambo asks for it by name, and warns.
"""

from __future__ import annotations

from torch import nn

from lorambo.model.targeting import _CLASSIFICATION_HEADS
from lorambo.nn import LoRAMBoLinear
from lorambo.user_warnings import warn_user

__all__ = ["FrozenHeadWarning", "warn_frozen_heads"]


class FrozenHeadWarning(UserWarning):
    """A classification head is frozen: neither a LoRA target nor in ``modules_to_save``."""


def frozen_heads(model: nn.Module) -> list[str]:
    """Dotted names of the outermost modules named like a classification head (``classifier``,
    ``score``, ``qa_outputs``, ``classification_head``) that hold parameters, none of them
    trainable, and no LoRA layer."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or name.rsplit(".", 1)[-1] not in _CLASSIFICATION_HEADS:
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params) \
                and not any(isinstance(m, LoRAMBoLinear) for m in module.modules()):
            found.append(name)
    return found


def warn_frozen_heads(model: nn.Module) -> None:
    """One :class:`FrozenHeadWarning` naming every frozen classification head and the fix."""
    heads = frozen_heads(model)
    if heads:
        warn_user(
            f"configure_model: the classification head {', '.join(map(repr, heads))} of {type(model).__name__} is "
            "frozen (neither a LoRA target nor in modules_to_save), so training leaves it as it is; a head that "
            f"from_pretrained initialised at random (a new num_labels) stays random. Pass modules_to_save="
            f"{heads!r} to configure_model (or to LoRAMBoOptimizer(...), whose configure() passes it on) to "
            "train it, or ignore this warning for a head that is already trained", FrozenHeadWarning)

"""Loading the plain model's state_dict into an adapted one.

A LoRAMBoLinear keeps the base layer as ``base_layer``, so the base weight's key is
``fc.base_layer.weight`` where the plain model had ``fc.weight``. A checkpoint of the plain model
(a pretrained one, loaded after ``configure_model`` under ``torch.device("meta")``) would load
nothing into the base layers; with ``strict=False`` they kept whatever memory ``to_empty`` left.
"""

from __future__ import annotations

__all__ = ["plain_keys_to_base_layer"]


def plain_keys_to_base_layer(module, state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: ``{prefix}weight`` / ``{prefix}bias`` (the plain layer's keys)
    load into the base layer, in the base's own layout (a Conv1D's [in, out]). A state_dict that
    holds both names for one tensor is ambiguous and refused."""
    for name in ("weight", "bias"):
        plain, wrapped = f"{prefix}{name}", f"{prefix}base_layer.{name}"
        if plain not in state_dict:
            continue
        if wrapped in state_dict:
            raise ValueError(f"{module._label}: the state_dict has both {plain!r} (the plain layer's key) and "
                             f"{wrapped!r}; keep one")
        state_dict[wrapped] = state_dict.pop(plain)

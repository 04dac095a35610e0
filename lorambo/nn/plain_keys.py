"""Loading the plain model's state_dict into an adapted one.

A LoRAMBoLinear keeps the base layer as ``base_layer``, so each of the base's keys gains that
prefix: ``fc.weight`` becomes ``fc.base_layer.weight``, and a parametrized weight's
``fc.parametrizations.weight.original0`` (``nn.utils.parametrizations.weight_norm``) becomes
``fc.base_layer.parametrizations.weight.original0``. A checkpoint of the plain model (a
pretrained one, loaded after ``configure_model`` under ``torch.device("meta")``) would load
nothing into the base layers; with ``strict=False`` they kept whatever memory ``to_empty`` left.
"""

from __future__ import annotations

__all__ = ["plain_keys_to_base_layer"]

# the LoRAMBoLinear's own extra state (rank and settings) sits at the key a base's extra state
# would have in the plain model: it stays the layer's
_OWN_EXTRA_STATE = "_extra_state"


def _state_keys(module, prefix: str, out: dict) -> None:
    """The keys ``module.state_dict()`` writes, without its state_dict hooks: a load must not run
    the user's save-time hooks (which may log, copy or gather); ``_save_to_state_dict`` is each
    module's own part (parameters, persistent buffers, extra state, a subclass's own keys)."""
    module._save_to_state_dict(out, prefix, keep_vars=True)  # keep_vars: references, no copies
    for name, child in module._modules.items():
        if child is not None:
            _state_keys(child, f"{prefix}{name}.", out)


def _base_keys(base) -> list[str]:
    """The keys of ``base``'s own state_dict (a parametrization's originals and buffers
    included), and ``weight`` / ``bias``, the plain layer's names whatever the base holds."""
    keys = dict.fromkeys(("weight", "bias"))
    _state_keys(base, "", keys)
    return [key for key in keys if key != _OWN_EXTRA_STATE]


def plain_keys_to_base_layer(module, state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the plain layer's keys (``{prefix}weight``, ``{prefix}bias``, and
    every other key of the base layer's state_dict) load into the base layer, in the base's own
    layout (a Conv1D's [in, out]). A state_dict that holds both names for one tensor is
    ambiguous and refused."""
    for name in _base_keys(module.base_layer):
        plain, wrapped = f"{prefix}{name}", f"{prefix}base_layer.{name}"
        if plain not in state_dict:
            continue
        if wrapped in state_dict:
            raise ValueError(f"{module._label}: the state_dict has both {plain!r} (the plain layer's key) and "
                             f"{wrapped!r}; keep one")
        state_dict[wrapped] = state_dict.pop(plain)

"""The embedding layers a peft adapter folder may hold whole (peft's ``save_embedding_layers``).

``save_pretrained(..., save_embedding_layers=True)``, or peft's "auto" after the vocabulary was
resized with ``embed_tokens`` / ``lm_head`` among the targets, stores the whole state of the
model's input and output embedding modules beside the LoRA weights: keys
``<module>.<state key>``, or ``<module>.base_layer.<state key>`` for a module that is itself a
LoRA target. ``PeftModel.from_pretrained`` loads them into the base model, so the adapter's
outputs need them; :func:`split_embedding_states` picks them out for ``import_peft`` to load
the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["check_embedding_states", "embedding_entries", "split_embedding_states"]


def _embedding_modules(model: nn.Module) -> list[str]:
    """Names of the model's input and output embedding modules (transformers' accessors)."""
    found = []
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, accessor)()
        except (AttributeError, NotImplementedError):  # not a transformers model, or it has none
            continue
        if module is not None:
            found += [n for n, m in model.named_modules() if m is module and n and n not in found]
    return found


def split_embedding_states(model: nn.Module, other: dict[str, torch.Tensor], lora_names: Iterable[str],
                           save_entries: Iterable[str]) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                 dict[str, torch.Tensor]]:
    """``({embedding module name: {state key: value}}, the other tensors)`` from ``other`` (the
    adapter's tensors that are not LoRA, keys relative to the model). A module that peft would
    wrap as a module to save (its name ends with an entry of ``save_entries``), or one tied to
    such a module (peft's ``ensure_weight_tying`` saves it as one), is left to the
    modules-to-save reader."""
    lora_names = set(lora_names)
    entries = [save_entries] if isinstance(save_entries, str) else [e for e in save_entries if isinstance(e, str) and e]
    saved = {id(p) for n, m in model.named_modules() if n and any(n.endswith(e) for e in entries)
             for p in m.parameters()}
    states: dict[str, dict[str, torch.Tensor]] = {}
    rest = dict(other)
    for name in _embedding_modules(model):
        if any(id(p) in saved for p in model.get_submodule(name).parameters()):
            continue
        prefix = f"{name}.base_layer." if name in lora_names else f"{name}."
        keys = set(model.get_submodule(name).state_dict())
        for key in [k for k in rest if k.startswith(prefix) and k[len(prefix):] in keys]:
            states.setdefault(name, {})[key[len(prefix):]] = rest.pop(key)
    return states, rest


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN included (the finiteness check names a NaN with its layer)."""
    return a.dtype == b.dtype and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def check_embedding_states(model: nn.Module, states: dict[str, dict[str, torch.Tensor]], where: str) -> None:
    """ValueError naming the first embedding layer whose saved state does not fit the model's
    (a vocabulary resized for training but not in ``model``), or whose weight the model ties to
    another saved one holding other values (loaded in turn, the last would win)."""
    loaded: dict[int, tuple[str, torch.Tensor]] = {}
    for name, state in states.items():
        have = model.get_submodule(name).state_dict(keep_vars=True)
        wrong = sorted(k for k in state if tuple(have[k].shape) != tuple(state[k].shape))
        if wrong or set(have) != set(state):
            shapes = ", ".join(f"{k}: saved {tuple(state[k].shape)}, model {tuple(have[k].shape)}" for k in wrong)
            raise ValueError(f"{where}: the adapter holds embedding layer {name!r} whole (peft's "
                             f"save_embedding_layers), and its state does not fit the model's ("
                             f"{shapes or f'keys {sorted(set(have) ^ set(state))}'}); resize the model's "
                             "token embeddings to the adapter's vocabulary first")
        for key, value in state.items():
            target = have[key]
            what = f"{name}.{key}"
            if id(target) in loaded and not _same(loaded[id(target)][1], value):
                raise ValueError(f"{where}: the adapter holds {loaded[id(target)][0]!r} and {what!r}, one tensor "
                                 "in the model (tied weights), with different values")
            loaded.setdefault(id(target), (what, value))


def embedding_entries(model: nn.Module, states: dict[str, dict[str, torch.Tensor]]
                      ) -> list[tuple[str, torch.Tensor, torch.dtype]]:
    """``(what, value, dtype)`` for every floating parameter an embedding layer loads, ``dtype``
    the model's (for the finiteness and dtype range checks of the other loaded values)."""
    out = []
    for name, state in states.items():
        params = dict(model.get_submodule(name).named_parameters())
        out += [(f"embedding layer {name!r}: parameter {key!r}", value, params[key].dtype)
                for key, value in state.items() if key in params and value.is_floating_point()]
    return out

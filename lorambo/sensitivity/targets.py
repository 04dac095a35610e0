"""Which weights the estimators look at, and making frozen ones differentiable for a while.

A *target* is one layer's weight matrix:
- a LoRA layer (duck-typed: a module with ``base_layer`` whose ``.weight`` is a Parameter, as
  ``lorambo.nn.LoRAMBoLinear``) -> its frozen base weight; the LoRA layer is the module hooked
  for inputs;
- a plain ``nn.Linear`` not inside a LoRA layer -> its weight [out, in];
- a module whose class is named ``Conv1D`` (transformers' GPT-2 layer) -> its weight [in, out].
Traces, operator norms and Frobenius norms are invariant to transposing the weight, so Conv1D
weights are used as stored.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorambo.model.argument import require_module
from lorambo.model.targeting import excluded_by_default
from lorambo.sharding import is_sharded

__all__ = ["Target", "find_targets", "differentiable", "refuse_sharded_weights", "refuse_parametrized_weights",
           "weight_holder"]


@dataclass(frozen=True)
class Target:
    name: str                # module name in ``model.named_modules()``
    module: nn.Module        # module whose input is the layer input (hooked by data_covariance)
    weight: torch.Tensor     # the Parameter the sensitivity is taken with respect to


def _is_lora(m: nn.Module) -> bool:
    base = getattr(m, "base_layer", None)
    return isinstance(base, nn.Module) and (isinstance(getattr(base, "weight", None), nn.Parameter)
                                            or parametrize.is_parametrized(base, "weight"))


def _is_plain(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), nn.Parameter)


def _candidates(model: nn.Module) -> tuple[dict[str, Target], dict[str, Target]]:
    """(LoRA targets, plain Linear/Conv1D targets not used as a LoRA base layer)."""
    lora, plain = {}, {}
    bases = set()
    for name, m in model.named_modules():
        if _is_lora(m):
            lora[name] = Target(name, m, m.base_layer.weight)
            bases.add(id(m.base_layer))
    for name, m in model.named_modules():
        if _is_plain(m) and id(m) not in bases and name not in lora:
            plain[name] = Target(name, m, m.weight)
    return lora, plain


def _output_head_weight(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except Exception:  # some models raise NotImplementedError
        return None
    return getattr(head, "weight", None) if isinstance(head, nn.Module) else None


def find_targets(model: nn.Module, modules: Sequence[str] | str | None = None) -> list[Target]:
    """Targets of ``model`` in module order.

    modules=None: every LoRA layer if the model has any, else the layers ``configure_model``
    adapts by default (peft's ``all-linear``: every nn.Linear / Conv1D except the output head,
    also when tied, classification heads and pooler layers). A list of module names: exactly
    those (LoRA layer names or Linear/Conv1D names), each named once. Layers whose weight is tied
    to another module's are measured on their own use of it (see :mod:`~lorambo.sensitivity.tied`).
    """
    require_module(model, "find_targets")
    lora, plain = _candidates(model)
    if modules is None:
        if lora:
            return list(lora.values())
        head = _output_head_weight(model)
        excluded = excluded_by_default(model)  # as configure_model's default (peft's all-linear)
        targets = [t for t in plain.values()
                   if t.name not in excluded and (head is None or t.weight is not head)]
        if not targets:
            raise ValueError(
                f"no targeted layer: {type(model).__name__} has no LoRA layer and no nn.Linear / "
                "Conv1D other than the output head")
        return targets
    if isinstance(modules, str):
        modules = [modules]
    modules = list(modules)
    if not modules:
        raise ValueError("no targeted layer: `modules` is an empty list")
    valid = {**plain, **lora}
    targets = []
    for name in modules:
        if name not in valid:
            some = ", ".join(repr(n) for n in list(valid)[:8]) or "(none)"
            raise ValueError(f"unknown module {name!r}; valid names include: {some}"
                             + (f" ... ({len(valid)} in all)" if len(valid) > 8 else ""))
        targets.append(valid[name])
    repeated = [n for n, k in Counter(modules).items() if k > 1]
    if repeated:
        raise ValueError(f"modules lists {repeated} more than once; pass each layer once")
    return targets


def refuse_sharded_weights(targets: Sequence[Target], who: str) -> None:
    """NotImplementedError naming the targets whose weight FSDP2 shards (a DTensor): the
    estimators that differentiate with respect to the weights cannot reach them, since FSDP's
    forward computes with an all-gathered copy and the sharded Parameter is not in the graph."""
    sharded = [t.name for t in targets if is_sharded(t.weight)]
    if sharded:
        raise NotImplementedError(
            f"{who}: layers {sharded[:4]}{' ...' if len(sharded) > 4 else ''} are sharded by FSDP2 (fully_shard): "
            "their weights are DTensors that the forward all-gathers, so no derivative with respect to them can "
            "be taken. Compute the sensitivities before fully_shard (every process on its own batches; the "
            "results are averaged over processes), or measure a sharded model with FisherProxy, which works there")


def refuse_parametrized_weights(targets: Sequence[Target], who: str) -> None:
    """NotImplementedError naming the targets whose weight a parametrization computes
    (``nn.utils.parametrizations.weight_norm``, ``spectral_norm``, any
    ``torch.nn.utils.parametrize``): the estimators that differentiate with respect to the
    weights hold one tensor, and the forward computes another at its own access, so no gradient
    reached them and the layers were skipped as unused by the loss."""
    computed = [t.name for t in targets if parametrize.is_parametrized(weight_holder(t.module), "weight")]
    if computed:
        raise NotImplementedError(
            f"{who}: the weights of layers {computed[:4]}{' ...' if len(computed) > 4 else ''} are computed by a "
            "parametrization (torch.nn.utils.parametrize: parametrizations.weight_norm, spectral_norm, ...), anew "
            "at every access, so no derivative with respect to them can be taken. Measure with "
            "sensitivity_method='frobenius' or 'data', which work there, or leave these layers out of the targets")


def weight_holder(module: nn.Module) -> nn.Module:
    """The module whose ``weight`` Parameter a target's weight is: a LoRA layer's base layer, or
    the plain layer itself."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) and _is_lora(module) else module


@contextmanager
def differentiable(weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Set requires_grad=True on ``weights`` inside the block; restore the flags on exit,
    also when the block raises. Gradients are only ever taken with torch.autograd.grad, so no
    ``.grad`` field (of these or any other parameter) is written."""
    saved = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, saved):
            w.requires_grad_(flag)

"""AB-LoRA ablation scores: how much each LoRA rank component matters, measured on held-out data.

Component k of layer i is row k of ``lora_A`` with column k of ``lora_B`` (its contribution to the
weight is ``s * B[:, k] A[k]``). ALoRA (Liu et al., 2024) scores it by two ablations of the
trained super-network on validation batches; in loss terms (lower is better):

    removed_k = L(all components except k) - L(all components)     > 0: removing k hurts
    alone_k   = L(no component at all)     - L(only component k)   > 0: k helps on its own
    score_k   = removed_k + alone_k

"only component k" keeps k alone in the *whole* model (every other component of every layer
off), as in the paper. Why both parts: removal alone misses components that are redundant with
others (each can be removed, yet together they matter); alone misses interactions.

Switching components off is exact and in place: the active columns of ``lora_B`` of every layer
are copied once, zeroed where needed, and copied back bit for bit (B[:, k] = 0 makes component k
contribute exactly 0). The model runs in eval mode (no dropout) under ``torch.no_grad``.
Cost: 2 + 2 * (number of components) evaluations of the mean loss over ``batches``.
Under torch.distributed every process passes its own batches; loss sums and counts are
all-reduced, so all processes get the scores of the union of the batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lorambo.distributed import SharedFailure
from lorambo.model.argument import require_module
from .inputs import Batches, LossFn, as_batch_list, check_some_batches, scalar_loss
from .mode import eval_mode
from .progress import show_bar

__all__ = ["ComponentAblation", "ablation_scores", "lora_targets"]


@dataclass(frozen=True)
class ComponentAblation:
    """Per-component ablation results of one layer (float64 tensors of length ``rank``)."""

    removed: torch.Tensor
    alone: torch.Tensor
    full_loss: float    # L(all components)
    empty_loss: float   # L(no component); NaN when alone=False

    @property
    def score(self) -> torch.Tensor:
        """AB-LoRA's score of each component, ``removed + alone`` (higher: worth more)."""
        return self.removed + self.alone


def lora_targets(model, modules=None) -> dict:
    """``{name: LoRAMBoLinear}`` for ``modules`` (None: every LoRA layer), with clear errors."""
    from lorambo.model import lora_layers

    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRAMBoLinear layer: ablation scores "
                         "need a model with adapters (configure_model first)")
    if modules is None:
        return layers
    names = [modules] if isinstance(modules, str) else list(modules)
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"modules {unknown!r} are not LoRAMBoLinear layers of "
                         f"{type(model).__name__}; LoRA layers: {list(layers)[:8]}")
    return {n: layers[n] for n in names}


def _mean_loss(model, loss_fn, batches) -> float:
    total = torch.zeros(2, dtype=torch.float64)
    failure = SharedFailure("ablation_scores")
    with failure:
        for batch in batches:
            loss = scalar_loss(loss_fn(model, batch), "ablation_scores")
            total[0] += float(loss)
            total[1] += 1.0
    loss_sum, count = failure.sum_and_check(total)
    check_some_batches(count, "ablation_scores")
    value = loss_sum / count
    if value != value:  # NaN
        raise RuntimeError("ablation: the held-out loss is NaN")
    return value


@contextmanager
def _saved_columns(layers):
    """Copies of every layer's active B columns, restored bit for bit on exit."""
    saved = {n: layer.lora_B[:, :layer.rank].clone() for n, layer in layers.items()}
    try:
        yield saved
    finally:
        for n, layer in layers.items():
            layer.lora_B[:, :layer.rank].copy_(saved[n])


@torch.no_grad()
def ablation_scores(model: torch.nn.Module, loss_fn: LossFn, batches: Batches,
                    modules: Sequence[str] | str | None = None, alone: bool = True,
                    progress: bool | None = None) -> dict[str, ComponentAblation]:
    """AB-LoRA scores of every active component of the targeted LoRA layers (see module doc).

    ``alone=False`` skips the "kept alone" evaluations (half the cost); ``alone`` is then 0.
    The ablation always switches off components of *every* LoRA layer for the "alone" part,
    also when ``modules`` selects only some layers to score, so every LoRA layer must be unmerged
    and enabled (RuntimeError otherwise, e.g. inside ``lorambo.disable_adapter``).
    ``progress``: a tqdm bar of the evaluations (one pass over ``batches`` each) on stderr,
    default on when stderr is a terminal (the main process only).
    """
    require_module(model, "ablation_scores")
    bar_on = show_bar(progress, "ablation_scores")
    # every process must run as many evaluations (one collective each) over the same components
    failure = SharedFailure("ablation_scores")
    with failure:
        batches = as_batch_list(batches, "ablation_scores")
        targets = lora_targets(model, modules)
        everyone = lora_targets(model)
        failure.settings = {"targets": list(targets), "ranks": {n: m.rank for n, m in everyone.items()},
                            "alone": bool(alone)}
        merged = [n for n, layer in everyone.items() if layer.merged]
        if merged:  # a merged layer's output ignores lora_B: its scores would all be 0
            raise RuntimeError(f"ablation_scores: LoRA layer(s) {merged[:5]} are merged into their base "
                               "weight, so switching their components off would change nothing; unmerge() "
                               "them first")
        disabled = [n for n, layer in everyone.items() if layer.adapter_disabled]
        if disabled:  # the forward runs the base layer alone: every score would be 0
            raise RuntimeError(f"ablation_scores: the adapters of LoRA layer(s) {disabled[:5]} are disabled "
                               "(inside lorambo.disable_adapter), so switching their components off would "
                               "change nothing; score them after the with-block")
    failure.check()
    ranks = sum(layer.rank for layer in targets.values())
    with eval_mode(model), tqdm(total=(1 + ranks) * (2 if alone else 1), disable=not bar_on,
                                desc="ablation_scores", unit="eval") as bar:

        def mean_loss() -> float:
            value = _mean_loss(model, loss_fn, batches)
            bar.update(1)
            return value

        with _saved_columns(everyone) as saved:
            full = mean_loss()
            removed = {}
            for name, layer in targets.items():
                out = torch.zeros(layer.rank, dtype=torch.float64)
                for k in range(layer.rank):
                    layer.lora_B[:, k].zero_()
                    out[k] = mean_loss() - full
                    layer.lora_B[:, k].copy_(saved[name][:, k])
                removed[name] = out
            alone_scores = {n: torch.zeros(layer.rank, dtype=torch.float64) for n, layer in targets.items()}
            empty = float("nan")
            if alone:
                for layer in everyone.values():
                    layer.lora_B[:, :layer.rank].zero_()
                empty = mean_loss()
                for name, layer in targets.items():
                    for k in range(layer.rank):
                        layer.lora_B[:, k].copy_(saved[name][:, k])
                        alone_scores[name][k] = empty - mean_loss()
                        layer.lora_B[:, k].zero_()
    return {n: ComponentAblation(removed[n], alone_scores[n], full, empty) for n in targets}

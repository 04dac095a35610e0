"""First-order and data sensitivities: gradient norms and input covariances, streamed over batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lorambo.distributed import SharedFailure, all_reduced_sums
from lorambo.model.argument import require_module
from lorambo.nn.hook_inputs import layer_input
from lorambo.ops.custom_op import autocast_off
from .inputs import (Batches, LossFn, as_batch_list, check_finite_loss, check_some_batches, compute_loss,
                     no_gradient_error)
from .mode import eval_mode
from .progress import show_bar
from .targets import differentiable, find_targets, refuse_parametrized_weights, refuse_sharded_weights
from .tied import untied
from .token_mask import TokenMask, batch_token_mask, real_tokens

__all__ = ["gradient_sensitivity", "data_covariance", "targets_without_gradient"]


def gradient_sensitivity(model: torch.nn.Module, loss_fn: LossFn, batches: Batches,
                         modules: Sequence[str] | str | None = None, progress: bool | None = None) -> dict[str, float]:
    """s_i = mean over batches of ||dL_b / dW_i||_F^2 (LoRAMBo's gradient sensitivity).

    Frozen base weights are made differentiable only during the call; gradients are taken with
    torch.autograd.grad, so no parameter's ``.grad`` changes. The model runs in eval mode, each
    module's flag restored after (see :mod:`~lorambo.sensitivity.mode`). Under torch.distributed
    the mean is over all ranks' batches. A loss that is not finite (NaN/inf) raises RuntimeError naming the
    batch: its gradients would turn every sensitivity into NaN. A layer the loss does not reach
    gets 0; RuntimeError if no targeted layer gets a gradient on any batch (see
    :func:`~lorambo.sensitivity.inputs.no_gradient_error`). ``progress``: a tqdm bar of the
    batches on stderr, default on when stderr is a terminal (the main process only).
    """
    require_module(model, "gradient_sensitivity")
    bar_on = show_bar(progress, "gradient_sensitivity")
    batches = as_batch_list(batches, "gradient_sensitivity")
    targets = find_targets(model, modules)
    refuse_sharded_weights(targets, "gradient_sensitivity")
    refuse_parametrized_weights(targets, "gradient_sensitivity")
    sums = torch.zeros(len(targets), dtype=torch.float64)
    reached = False
    failure = SharedFailure("gradient_sensitivity", settings={"targets": [t.name for t in targets]})
    with failure, untied(model, targets) as measured, differentiable([t.weight for t in measured]), \
            eval_mode(model), \
            tqdm(total=len(batches), disable=not bar_on, desc="gradient_sensitivity", unit="batch") as bar:
        weights = [t.weight for t in measured]
        for index, batch in enumerate(batches):
            loss = compute_loss(loss_fn, model, batch, who="gradient_sensitivity")
            check_finite_loss(loss, index, "gradient_sensitivity")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    reached = True
                    sums[i] += float(g.detach().double().pow(2).sum())
            bar.update(1)
    # one collective: the sums, the batch count, processes that reached a layer, the status
    *sums, count, reached_on = failure.sum_and_check(torch.cat([
        sums, torch.tensor([float(len(batches)), float(reached)], dtype=torch.float64)]))
    check_some_batches(count, "gradient_sensitivity")
    if not reached_on:
        raise no_gradient_error("gradient_sensitivity", [t.name for t in targets])
    return {t.name: s / count for t, s in zip(targets, sums)}


def targets_without_gradient(model: torch.nn.Module, loss_fn: LossFn, batch: Any,
                             modules: Sequence[str] | str | None = None) -> list[str]:
    """Names of the targeted layers whose weight the loss on ``batch`` does not depend on (one
    forward and backward, in eval mode; e.g. BERT's pooler under a loss on the hidden states)."""
    return unreached_targets(model, loss_fn, batch, modules, "targets_without_gradient")


def unreached_targets(model, loss_fn, batch, modules, who: str, need_grad: bool = True) -> list[str]:
    """:func:`targets_without_gradient`, its errors naming ``who``: the public function the user
    called. ``need_grad=False``: a loss without a graph reaches none of them (no error)."""
    require_module(model, who)
    targets = find_targets(model, modules)
    refuse_sharded_weights(targets, who)
    refuse_parametrized_weights(targets, who)
    with untied(model, targets) as measured, differentiable([t.weight for t in measured]), eval_mode(model):
        weights = [t.weight for t in measured]
        loss = compute_loss(loss_fn, model, batch, need_grad=need_grad, who=who)
        if not loss.requires_grad:
            return [t.name for t in targets]
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return [t.name for t, g in zip(targets, grads) if g is None]


def unreached_by_any(model, loss_fn, batches: list, modules, who: str) -> list[str]:
    """Names of the targeted layers that no batch of ``batches`` gives a gradient
    (``LoRAMBoOptimizer.compute_sensitivities`` runs it first). The first batch checks every
    layer, each next one only those the batches before did not reach, until none is left: a
    layer that one task's head or one routed expert serves is reached by some batch, not
    necessarily the first. A layer no loss uses (BERT's pooler) costs a forward per batch."""
    unreached = list(modules)
    for index, batch in enumerate(batches):
        # past the first batch, only the unreached layers are differentiable: a loss that uses
        # none of them (and no other trainable weight) has no graph, which is no error here
        unreached = unreached_targets(model, loss_fn, batch, unreached, who, need_grad=index == 0)
        if not unreached:
            break
    return unreached


def data_covariance(model: torch.nn.Module, loss_fn: LossFn, batches: Batches,
                    modules: Sequence[str] | str | None = None, token_mask: TokenMask = "auto",
                    progress: bool | None = None) -> dict[str, torch.Tensor]:
    """G_i = E[x x^T] [in, in] over every real token x fed to each targeted layer.

    A forward hook on the layer (the LoRA layer itself for LoRA layers) takes its first input,
    flattened to [tokens, in]; sums of x^T x and token counts are accumulated (float32 for
    half-precision inputs, else the input dtype, also when ``loss_fn`` runs the model under
    autocast) and divided at the end, so memory is O(in^2)
    per layer whatever the number of batches. ``loss_fn`` is only called to run the forward (its
    result is ignored; any callable(model, batch) works) under torch.no_grad(), in eval mode (see
    :mod:`~lorambo.sensitivity.mode`).

    Padding: ``token_mask`` says which positions are real tokens (see
    :mod:`~lorambo.sensitivity.token_mask`). The default ``"auto"`` takes a dict batch's
    ``"attention_mask"``, so the same sentences give the same G however they are padded or
    batched; ``None`` counts every position, pads included. A batch that feeds no real token to
    the targeted layers (e.g. sequence length 0) raises ValueError naming it, and so does a layer
    whose inputs hold NaN/inf, or whose input shape does not match the mask.

    ``progress``: a tqdm bar of the batches on stderr, default on when stderr is a terminal
    (the main process only).
    """
    require_module(model, "data_covariance")
    bar_on = show_bar(progress, "data_covariance")
    batches = as_batch_list(batches, "data_covariance")
    targets = find_targets(model, modules)
    sums: dict[int, torch.Tensor] = {}
    counts = torch.zeros(len(targets), dtype=torch.float64)

    batch_tokens = [0]  # tokens the current batch fed to any targeted layer
    mask: list = [None]  # the current batch's token mask

    def hook_for(i):
        def hook(module, args, kwargs, output):
            x = layer_input(args, kwargs).detach()
            x = real_tokens(x, mask[0], targets[i].name, "data_covariance")   # (tokens, in)
            batch_tokens[-1] += x.shape[0]
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            with autocast_off(x.device.type):  # a forward under autocast would give x^T x in its dtype
                xtx = x.T @ x
            sums[i] = xtx if i not in sums else sums[i] + xtx
            counts[i] += x.shape[0]
        return hook

    handles = [t.module.register_forward_hook(hook_for(i), with_kwargs=True) for i, t in enumerate(targets)]
    failure = SharedFailure("data_covariance", settings={"targets": [t.name for t in targets]})
    with failure:
        try:
            with torch.no_grad(), eval_mode(model), tqdm(total=len(batches), disable=not bar_on,
                                                         desc="data_covariance", unit="batch") as bar:
                for batch in batches:
                    mask[0] = batch_token_mask(token_mask, batch, "data_covariance")
                    loss_fn(model, batch)
                    batch_tokens.append(0)
                    bar.update(1)
        finally:
            for h in handles:
                h.remove()
        empty = [i for i, n in enumerate(batch_tokens[:len(batches)]) if n == 0]
        if empty:
            raise ValueError(f"data_covariance: batch(es) {empty[:10]} of {len(batches)} fed 0 tokens to "
                             "the targeted layers (empty sequences?); leave them out")
    # under torch.distributed a layer may run on some processes only (routed experts): the
    # others add zeros, and only a layer no process ran is an error. One collective and one host
    # copy for the token counts, the calls, the batch count and the failed processes.
    calls = torch.tensor([float(i in sums) for i in range(len(targets))], dtype=torch.float64)
    stats = failure.sum_and_check(torch.cat([counts, calls, torch.tensor([float(len(batches))], dtype=torch.float64)]))
    check_some_batches(stats[-1], "data_covariance")
    counts, calls = stats[:len(targets)], stats[len(targets):2 * len(targets)]
    missing = [t.name for i, t in enumerate(targets) if calls[i] == 0]
    if missing:
        raise RuntimeError(f"the forward never ran through {missing}: loss_fn did not call them")
    for i, t in enumerate(targets):
        if i not in sums:  # zeros in the dtype the hook accumulates inputs of the layer's dtype in
            dtype = torch.float32 if t.weight.dtype in (torch.float16, torch.bfloat16) else t.weight.dtype
            width = _input_width(t)
            sums[i] = torch.zeros(width, width, dtype=dtype, device=t.weight.device)
    starved = [t.name for i, t in enumerate(targets) if counts[i] == 0]
    if starved:
        raise ValueError(f"data_covariance: layer(s) {starved[:10]} received 0 tokens over all batches")
    totals = all_reduced_sums([sums[i] for i in range(len(targets))])  # packed collectives
    broken = [t.name for t, total in zip(targets, totals) if not bool(torch.isfinite(total).all())]
    if broken:  # a NaN/inf input token; downstream it would surface as a failed eigh/SVD
        raise ValueError(f"data_covariance: the inputs fed to layer(s) {broken[:10]} contain NaN/inf "
                         "(or overflow the accumulation dtype); check the batches")
    return {t.name: total / count for t, total, count in zip(targets, totals, counts)}


def _input_width(target) -> int:
    """Features of the layer's input: ``in_features`` (Linear, LoRAMBoLinear), else the first
    dim of a Conv1D's [in, out] weight."""
    width = getattr(target.module, "in_features", None)
    return int(width) if width is not None else int(target.weight.shape[0])

"""Per-layer Hessian operator norms ||H_ii||_2 = max |eigenvalue| by power iteration."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lorambo.model.argument import require_module
from lorambo.nn.finite_numbers import is_finite_number, shown_number
from .blocks import block_products
from .estimate import Estimate
from .hvp import HessianOperator
from .inputs import Batches, LossFn, NonFiniteProducts, as_batch_list, check_positive, check_seed
from .mode import eval_mode
from .probes import rademacher
from .progress import show_bar
from .targets import differentiable, find_targets, refuse_parametrized_weights, refuse_sharded_weights
from .tied import untied

__all__ = ["hessian_opnorm"]


def hessian_opnorm(model: torch.nn.Module, loss_fn: LossFn, batches: Batches,
                   modules: Sequence[str] | str | None = None, num_iters: int = 20, seed: int = 0,
                   tol: float = 1e-4, probes_per_pass: int = 8, batched: bool | None = None,
                   progress: bool | None = None) -> dict[str, Estimate]:
    """Largest |eigenvalue| of each diagonal Hessian block H_ii (mean loss over ``batches``).

    Power iteration v <- H_ii v / ||H_ii v|| for all layers at once: every iteration sends one
    probe per unconverged layer, nonzero on that layer only, so the cross terms H_ij v_j never
    enter (see ``blocks``), through one double-backward pass (vmapped or looped, see ``hvp``).

    value = ||H_ii v|| for the current unit v: a lower bound on ||H_ii||_2 that converges also
    when two eigenvalues of opposite sign tie in magnitude (where the Rayleigh quotient
    oscillates); rate (|lambda_2| / |lambda_1|)^(2k). A layer stops when the value changes by at
    most tol * value; ``stderr`` = the last change (0 when exactly converged), ``num_probes`` =
    iterations used. A non-finite product raises RuntimeError (power iteration cannot skip it).
    The model runs in eval mode, each module's flag restored after (see
    :mod:`~lorambo.sensitivity.mode`). ``progress``: a tqdm bar of the iterations on stderr
    (ends full when every layer converged early), default on when stderr is a terminal (the
    main process only).
    """
    require_module(model, "hessian_opnorm")
    bar_on = show_bar(progress, "hessian_opnorm")
    num_iters = check_positive("num_iters", num_iters)
    probes_per_pass = check_positive("probes_per_pass", probes_per_pass)
    seed = check_seed(seed)
    # a NaN or negative tol never stops, None failed mid-loop with a TypeError
    if not (is_finite_number(tol) and tol >= 0.0):
        raise ValueError(f"tol must be a finite number >= 0, got {shown_number(tol)}")
    batches = as_batch_list(batches, "hessian_opnorm")
    targets = find_targets(model, modules)
    refuse_sharded_weights(targets, "hessian_opnorm")
    refuse_parametrized_weights(targets, "hessian_opnorm")
    weights = [t.weight for t in targets]
    work = [torch.promote_types(w.dtype, torch.float32) for w in weights]
    v = {}
    for i, w in enumerate(weights):
        x = rademacher((w.numel(), 1), seed, i, "opnorm", dtype=work[i], device=w.device)
        v[i] = x / x.norm()
    value = [math.nan] * len(weights)
    change = [math.inf] * len(weights)
    iters = [0] * len(weights)
    with untied(model, targets) as measured, differentiable([t.weight for t in measured]), eval_mode(model), \
            tqdm(total=num_iters, disable=not bar_on, desc="hessian_opnorm", unit="iter") as bar:
        names = [t.name for t in targets]
        op = HessianOperator(model, loss_fn, batches, [t.weight for t in measured], batched, names=names,
                             who="hessian_opnorm",
                             settings={"targets": names, "num_iters": num_iters, "seed": seed,
                                       "tol": tol, "probes_per_pass": probes_per_pass})
        active = set(range(len(weights)))
        for _ in range(num_iters):
            if not active:
                break
            hv = block_products(op, {i: v[i] for i in sorted(active)}, probes_per_pass)
            for i in sorted(active):
                if not torch.isfinite(hv[i]).all():
                    with op.naming_the_batch():
                        raise NonFiniteProducts(f"non-finite Hessian-vector product in the power "
                                                f"iteration of {targets[i].name!r}")
                norm = float(hv[i].norm())
                change[i] = abs(norm - value[i]) if iters[i] else math.inf
                value[i], iters[i] = norm, iters[i] + 1
                if norm == 0.0:  # H_ii v = 0 for a random v: the block is (numerically) zero
                    change[i] = 0.0
                    active.discard(i)
                    continue
                v[i] = hv[i] / norm
                if change[i] <= tol * norm:
                    active.discard(i)
            bar.update(1)
        bar.total = bar.n  # the iterations actually run: the bar ends full
        bar.refresh()
    return {t.name: Estimate(value[i], change[i], iters[i]) for i, t in enumerate(targets)}

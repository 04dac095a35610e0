"""Per-layer Hessian traces Tr(H_ii) of the loss w.r.t. each targeted weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .blocks import run_programs
from lorambo.model.argument import require_module
from .estimate import Estimate, Moments
from .hvp import HessianOperator
from .inputs import Batches, LossFn, NonFiniteProducts, as_batch_list, check_positive, check_seed
from .mode import eval_mode
from .probes import rademacher
from .progress import show_bar
from .reductions import per_layer_dots
from .sketch import hutchpp_program, xtrace_program
from .targets import differentiable, find_targets, refuse_parametrized_weights, refuse_sharded_weights
from .tied import untied
from lorambo.user_warnings import warn_user

__all__ = ["hessian_trace"]

METHODS = ("hutchinson", "hutch++", "xtrace")


def hessian_trace(model: torch.nn.Module, loss_fn: LossFn, batches: Batches,
                  modules: Sequence[str] | str | None = None, num_probes: int = 64,
                  method: str = "hutchinson", seed: int = 0, probes_per_pass: int = 8,
                  stderr_target: float | None = None, progress: bool | None = None,
                  batched: bool | None = None) -> dict[str, Estimate]:
    """Estimate Tr(H_ii), the trace of the Hessian block of the mean loss over ``batches`` with
    respect to each targeted weight W_i (see ``find_targets``; frozen weights are made
    differentiable only during the call, other parameters' ``.grad`` are never touched).

    method="hutchinson": joint Rademacher probes v = (v_1..v_L) over all targeted weights,
      sample_i = v_i^T (Hv)_i = v_i^T H_ii v_i + sum_{j!=i} v_i^T H_ij v_j. The cross terms have
      mean 0 (independent probes), so every layer's trace comes from the *same* probes at the
      cost of one HVP per probe; they add variance, which the stderr (sample std / sqrt(n))
      includes. ``num_probes`` probes in passes of ``probes_per_pass``: one forward/backward per
      batch and pass, then the pass's probes vmapped through one double backward (batched=True)
      or looped over the retained graph (batched=False); batched=None picks vmap on
      accelerators, the loop on CPU (faster there, see ``hvp``). probes_per_pass=1 is the plain
      sequential HVP loop. All give the same numbers for the same seed. Probes whose
      product is not finite are skipped with a warning; RuntimeError if all are.
      ``stderr_target`` (relative): stop after the first pass where every layer has
      ``rel_stderr <= stderr_target`` (at least 2 probes; a layer whose trace is ~0 may never
      meet a relative target, then all ``num_probes`` are used).
    method="hutch++" / "xtrace": variance-reduced estimators (see ``sketch``) run on every block
      H_ii with layer-restricted probes (see ``blocks``), ``num_probes`` products *per layer*.
      They beat Hutchinson when H_ii is near-PSD with a decaying spectrum; Hessians are
      indefinite, so the gain is not guaranteed. stderr: sample std of the residual Hutchinson
      part (hutch++) or of the exchangeable leave-one-out estimates (xtrace; optimistic, see
      ``sketch``). Products that are not finite: skipped probe columns where the method allows.
    Too few finite products for an estimate raise RuntimeError, naming the first batch whose loss
    was NaN/inf if one was (its mean over no examples, e.g. every label at ignore_index, is NaN).

    Works on transformers models as shipped: attention runs a path with a double backward
    while the products are taken (see ``attention``). Deterministic for a fixed seed: the model
    runs in eval mode (see :mod:`~lorambo.sensitivity.mode`), each module's flag restored after.
    ``progress``: a tqdm bar on stderr (probes for "hutchinson", Hessian-vector products for
    "hutch++" / "xtrace"; it ends full at those taken, also when ``stderr_target`` stops early),
    default on when stderr is a terminal (rank 0 only). Under torch.distributed every rank passes
    its own batches (any number, none included) and the same settings (ValueError on every rank
    otherwise); all ranks get the estimate for the mean loss over all ranks' batches (sums and
    batch counts all-reduced).
    """
    require_module(model, "hessian_trace")
    progress = show_bar(progress, "hessian_trace")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    num_probes = check_positive("num_probes", num_probes)
    probes_per_pass = check_positive("probes_per_pass", probes_per_pass)
    seed = check_seed(seed)
    if stderr_target is not None and method != "hutchinson":
        raise ValueError("stderr_target (early stopping) is only supported for method='hutchinson'")
    if stderr_target is not None and not stderr_target > 0:
        raise ValueError(f"stderr_target must be > 0, got {stderr_target!r}")
    batches = as_batch_list(batches, "hessian_trace")
    targets = find_targets(model, modules)
    refuse_sharded_weights(targets, "hessian_trace")
    refuse_parametrized_weights(targets, "hessian_trace")
    with untied(model, targets) as measured, differentiable([t.weight for t in measured]), eval_mode(model):
        weights = [t.weight for t in measured]
        names = [t.name for t in targets]
        op = HessianOperator(model, loss_fn, batches, weights, batched, names=names, who="hessian_trace",
                             settings={"targets": names, "method": method, "num_probes": num_probes,
                                       "seed": seed, "probes_per_pass": probes_per_pass,
                                       "stderr_target": stderr_target})
        with op.naming_the_batch():
            if method == "hutchinson":
                results, bad = _hutchinson(op, num_probes, seed, probes_per_pass, stderr_target,
                                           progress)
            else:
                program = hutchpp_program if method == "hutch++" else xtrace_program
                progs = {i: program(w.numel(), num_probes, seed, i,
                                    torch.promote_types(w.dtype, torch.float32), w.device)
                         for i, w in enumerate(weights)}
                # at most num_probes products per layer (fewer for a layer with fewer weights)
                with tqdm(total=num_probes * len(weights), disable=not progress,
                          desc=f"hessian_trace ({method})", unit="product") as bar:
                    out = run_programs(op, progs, probes_per_pass, bar.update)
                    bar.total = bar.n  # the products actually taken: the bar ends full
                    bar.refresh()
                results = [out[i][0] for i in range(len(weights))]
                bad = sum(out[i][1] for i in range(len(weights)))
    if bad:
        warn_user(f"hessian_trace skipped {bad} probe(s) whose Hessian-vector product was "
                  "not finite (NaN/inf)", RuntimeWarning)
    return {t.name: est for t, est in zip(targets, results)}


def _hutchinson(op: HessianOperator, num_probes, seed, probes_per_pass, stderr_target, progress):
    weights = op.weights
    moments = Moments(len(weights))
    bad, done = 0, 0
    with tqdm(total=num_probes, disable=not progress, desc="hessian_trace", unit="probe") as bar:
        while done < num_probes:
            count = min(probes_per_pass, num_probes - done)
            vs = [torch.stack([rademacher((w.numel(),), seed, i, "hutchinson", done + p,
                                          dtype=w.dtype, device=w.device).view(w.shape)
                               for p in range(count)])
                  for i, w in enumerate(weights)]

            def quadratic_forms(hvs, vs=vs):  # (P, L): v_i^T (Hv)_i, summed in float64, one copy
                return [per_layer_dots(hvs, vs).cpu()]

            (q,) = op.apply(vs, quadratic_forms)
            finite = torch.isfinite(q).all(dim=1)
            bad += int((~finite).sum())
            moments.add(q[finite])
            done += count
            bar.update(count)
            if (stderr_target is not None and moments.n >= 2
                    and bool((moments.rel_stderr() <= stderr_target).all())):
                break
        bar.total = bar.n  # the probes actually taken (stderr_target stops early): the bar ends full
        bar.refresh()
    if moments.n == 0:
        raise NonFiniteProducts(f"all {done} Hessian-vector products were non-finite (NaN/inf): "
                           "check the loss on these batches")
    return moments.estimates(), bad

"""Online rank growth and rank moves during training, in place in the LoRAMBoLinear pools.

Marginal benefit of one more rank. Let G = dL/dW = sum_tokens dY^T X be the gradient of the full
weight of a layer ([out, in]; X its input, dY the gradient at its output). Its current adapter
B_r A_r can already move W along the tangent directions {U M + N V^T} with U an orthonormal basis
of col(B_r) and V one of row(A_r) (with B = 0 only {N V^T}: U is then empty). The part of G no
existing component can follow is the projection

    G_perp = (I - U U^T) G (I - V V^T).

A new component u v^T (unit Frobenius norm) lowers the loss at first order by <G_perp, u v^T>
per unit step, at most sigma_1(G_perp) for the top singular pair: Delta_i = sigma_1(G_perp).
A second new rank in the same layer is worth sigma_2, and so on, so a layer's marginal benefits
sigma_1 >= sigma_2 >= ... are a concave curve and the greedy of ``greedy.py`` (best
Delta_i / (d_i + k_i) first, stop when no gain exceeds the threshold or the budget is spent) is the
LoRAMBo online allocator. With a curvature h_i (e.g. a Hessian trace per parameter), the Newton
decrease along that direction, Delta_i^2 / (2 h_i), replaces Delta_i.

Matrix-free. G is never formed: G v = dY^T (X v) and G^T u = X^T (dY u) cost O(T (d + k)) per
vector for T tokens, against O(T d k) time and O(d k) memory for G. sigma_1..sigma_m come from a
randomized block power iteration (Halko, Martinsson, Tropp 2011) with m + oversample columns,
run for all layers in lockstep (``benefits.py``): each step is one grouped product over every
layer (the grouped Triton kernels on CUDA), and under DDP one all-reduce of one flat buffer
(mean over processes: the DDP-averaged gradient); the results are broadcast from process 0 in
one buffer, so every process decides the same thing, and reach the host in one copy (a single
CPU process keeps the plain per-layer loop: same arithmetic, nothing to save there).

Growth is function-preserving: ``set_rank`` gives the new slots B = 0. Their rows of A are then
set to the top right singular vectors of G_perp (scaled so that their response to the captured
inputs has the rms of a Kaiming row's: see :func:`grow_layer`), so
the first optimizer step on the new columns of B moves W along the best new direction instead of
a random one. Rows of A orthogonal to the old rows keep the components independent.

X and dY are recorded by hooks only while a :class:`ActivationCapture` is armed (decision steps),
so there is no overhead on other steps. docs/architecture.md follows one training step through.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from lorambo.allocation.benefits import (projected_top_singular, projected_top_singular_many,
                                         subspace_basis)
from lorambo.allocation.frozen import frozen_layers
from lorambo.allocation.greedy import greedy_allocate
from lorambo.allocation.move_directions import move_directions
from lorambo.allocation.move_plan import plan_moves
from lorambo.allocation.report import DecisionLog
from lorambo.allocation.validate import check_rank_bounds
from lorambo.distributed import SharedFailure, all_reduced_mean, decision_generator, world_size
from lorambo.model.partial_edit import add_note, note_rank_changes_kept
from lorambo.nn.finite_numbers import float_value, is_finite_number, shown_number
from lorambo.nn.grad_passes import CallParameters, accumulator_nodes, pass_feeds_grad
from lorambo.nn.hook_inputs import layer_input
from lorambo.nn.edit_snapshot import EditSnapshot
from lorambo.nn.optimizer_argument import each_optimizer, optimizer_argument
from lorambo.nn.optimizer_state import check_slot_state_editable
from lorambo.nn.pool_ops import keep_components_many
from lorambo.ops.custom_op import autocast_off
from lorambo.sensitivity.token_mask import mask_selects_rows
from lorambo.user_warnings import warn_user, warns_when_done

__all__ = ["ActivationCapture", "subspace_basis", "projected_top_singular",
           "projected_top_singular_many", "plan_growth", "plan_moves", "grow_layer", "layer_benefits_many",
           "check_growth_settings", "compile_hint", "nothing_captured"]


def compile_hint() -> str:
    """Why a compiled model captures nothing, when that can be the reason: torch.compile guards
    on no module hooks by default (``skip_nnmodule_hook_guards``), so code compiled before the
    capture's hooks were added keeps running without them."""
    dynamo = sys.modules.get("torch._dynamo")  # imported by torch.compile only
    if dynamo is None or not getattr(dynamo.config, "skip_nnmodule_hook_guards", False):
        return ""
    return ("; if the model runs under torch.compile, set torch._dynamo.config.skip_nnmodule_hook_guards = "
            "False before compiling: otherwise compiled code never runs the capture's hooks")


class ActivationCapture:
    """Record ``X`` [T, in] and ``dY`` [T, out] of each layer while armed (a context manager).

    Calls of a layer within one armed period (gradient accumulation, a layer used twice) are all
    kept and summed in the products; the dY of several backward passes through one call
    (``retain_graph=True``) are summed. Only passes that accumulate into the layer's ``.grad``
    count: a ``torch.autograd.grad`` pass (a gradient penalty, an adversarial example's input
    gradient, a Hessian-vector product) is left out (:mod:`lorambo.nn.grad_passes`). Outputs that
    do not require grad (eval, no_grad) are skipped.

    Padding: :meth:`set_token_mask` gives the [B, T] mask of the batch the following calls run
    on (:mod:`lorambo.sensitivity.token_mask`); only rows of real tokens are kept, so G, the
    rows ``max_tokens`` picks and the scale of new A rows (:func:`grow_layer`) do not depend on
    how the batch is padded. Without a mask every row is kept, pads included.

    Memory: X is a view of what autograd saves anyway; dY is extra, T x out per layer until the
    decision. ``max_tokens`` = m keeps evenly spaced rows (of the T real ones) per call, rows
    ``floor(i (T - 1) / (m - 1))`` for i < m (dY rows scaled by T / m, so G keeps its scale;
    float16 ones kept in float32, where the scaled rows of a GradScaler's scaled loss cannot
    overflow), to bound that on large models. The rows are fixed, not random: G is
    approximated, not estimated without bias.
    """

    def __init__(self, layers: Mapping[str, torch.nn.Module], max_tokens: int | None = None):
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens={max_tokens!r} must be an int >= 1 or None")
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.layers = dict(layers)
        self.inputs: dict[str, list[torch.Tensor | None]] = {n: [] for n in self.layers}  # None: dropped
        self.grads: dict[str, dict[int, torch.Tensor]] = {n: {} for n in self.layers}
        self._handles = []
        self._call_params = CallParameters()  # the parameters each call used (grad_passes.py)
        self.set_token_mask(None)

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """The [B, T] bool mask (True = real token) of the batch the next layer calls run on;
        None: keep every row. A layer input whose leading dims are neither [B, T] nor [B] is a
        ValueError naming the layer and the shapes."""
        self._mask = mask
        self._real_rows: dict[torch.device, torch.Tensor] = {}

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of the real-token rows of ``x`` [..., in], None for all of them."""
        if self._mask is None or not mask_selects_rows(x.shape, self._mask, name, "ActivationCapture"):
            return None
        if x.device not in self._real_rows:  # one host sync per batch, not one per layer call
            self._real_rows[x.device] = self._mask.reshape(-1).nonzero().squeeze(1).to(x.device)
        return self._real_rows[x.device]

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if not self._handles:
            self._handles = [handle for n, m in self.layers.items() for handle in (
                self._call_params.register(m, self._hook(n)))]

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._call_params.clear()
        self.set_token_mask(None)  # a mask belongs to one batch: the next capture gives its own

    def clear(self) -> None:
        for n in self.layers:
            self.inputs[n].clear()
            self.grads[n].clear()

    def __enter__(self):
        self.arm()
        return self

    def __exit__(self, *exc):
        self.disarm()

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            trainable = self._call_params.current(module)
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            x = layer_input(args, kwargs).detach()
            rows, scale = self._rows(name, x), 1.0
            x = x.reshape(-1, x.shape[-1])                                     # (T, in)
            kept = x.shape[0] if rows is None else rows.numel()
            if kept == 0:  # only pads: nothing to learn from (as if the layer had not run)
                return
            if self.max_tokens is not None and kept > self.max_tokens:
                # rows floor(i (kept - 1) / (m - 1)) in integers: a float linspace truncated to
                # other rows under another default dtype or device (24.999... -> 24)
                pick = torch.arange(self.max_tokens, device=x.device) * (kept - 1) // max(self.max_tokens - 1, 1)
                rows, scale = (pick if rows is None else rows[pick]), kept / self.max_tokens
            if rows is not None:
                x = x.index_select(0, rows)                                    # (kept, in)
            index = len(self.inputs[name])
            self.inputs[name].append(x)

            nodes = accumulator_nodes(module, output, trainable)

            def grad_hook(g, index=index, rows=rows, scale=scale):
                if not pass_feeds_grad(nodes):  # torch.autograd.grad: the step's gradient is not in it
                    return
                g = g.detach().reshape(-1, g.shape[-1])                        # (T, out)
                if rows is not None:
                    g = g.index_select(0, rows)
                    if scale != 1.0:
                        # in float32 for float16 dY: a GradScaler keeps the scaled dY not far below
                        # float16's 65504, and T / m times them came out inf (the decision of a
                        # step that trained was skipped as not finite)
                        g = (g.float() if g.dtype == torch.float16 else g) * scale
                # several backward passes through one forward (retain_graph=True, a loss per
                # task) accumulate, as the parameters' .grad do
                previous = self.grads[name].get(index)
                self.grads[name][index] = g if previous is None else previous + g

            output.register_hook(grad_hook)
            if torch._C._current_graph_task_id() != -1:
                # a forward run by a backward: gradient checkpointing's recomputation. Without
                # re-entry (use_reentrant=False) the recomputed output gets no gradient, so its X
                # would sit unused until the decision; drop it when this backward ends
                torch.autograd.Variable._execution_engine.queue_callback(
                    lambda index=index: self._drop_if_no_grad(name, index))
        return hook

    def _drop_if_no_grad(self, name: str, index: int) -> None:
        if index not in self.grads[name] and index < len(self.inputs[name]):
            self.inputs[name][index] = None

    def pairs(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(X, dY) of every call of layer ``name`` whose backward ran."""
        return [(x, self.grads[name][i]) for i, x in enumerate(self.inputs[name]) if i in self.grads[name]]

    def has_data(self) -> bool:
        return any(self.grads[n] for n in self.layers)

    def missing_data(self, step=None) -> str:
        """What the user forgot when :meth:`has_data` is False: the layers ran (their inputs were
        recorded) but no backward reached them, or nothing ran while the hooks were armed."""
        if any(x is not None for n in self.layers for x in self.inputs[n]):
            return ("no gradient reached the layers (their forward ran, but no backward): call loss.backward() "
                    f"inside opt.capture({'step' if step is None else step}), after the forward")
        return nothing_captured()


def nothing_captured() -> str:
    return ("no activations were captured: run its forward and backward inside opt.capture(step) or "
            f"after opt.begin_step(step){compile_hint()}")


def plan_growth(gains: Mapping[str, Sequence[float]], costs: Mapping[str, int],
                room: Mapping[str, int], budget_left: int, threshold: float = 0.0) -> dict[str, int]:
    """How many ranks to add per layer: greedy on gain / cost over each layer's concave curve
    ``gains[name][j]`` (gain of its j-th new rank), only gains > ``threshold``, at most
    ``room[name]`` new ranks, spending at most ``budget_left`` parameters. ``{name: n_new > 0}``."""
    names = [n for n in gains if room.get(n, 0) > 0]
    if not names or budget_left <= 0:
        return {}
    curves = [np.minimum.accumulate(np.asarray(gains[n], dtype=np.float64)) for n in names]
    cost = np.asarray([int(costs[n]) for n in names], dtype=np.int64)
    upper = np.asarray([min(int(room[n]), c.size) for n, c in zip(names, curves)], dtype=np.int64)

    def gain(i: int, j: int) -> float:
        g = float(curves[i][j])
        return g if g > threshold and math.isfinite(g) else 0.0

    added = greedy_allocate(cost, np.zeros(len(names), dtype=np.int64), upper, int(budget_left), gain)
    return {n: int(a) for n, a in zip(names, added) if a > 0}

@torch.no_grad()
def grow_layer(layer, new_rank: int, directions: torch.Tensor | None = None, optimizer=None,
               generator: torch.Generator | None = None,
               inputs: Sequence[torch.Tensor] | None = None, failure: SharedFailure | None = None) -> int:
    """Grow ``layer`` to ``new_rank`` in place (B = 0 in the new slots: the output is unchanged),
    optionally aligning the new rows of A with ``directions`` [in, >= n_new]. Returns the old rank.

    Scale of an aligned row: a Kaiming row of norm rho sees rms(a.x) = rho * rms(x entries), but a
    top singular direction v of G follows the dominant input directions, so at the same norm its
    rms(v.x) was measured 4-11x larger on MiniLM, which blew up the first steps on the new columns
    of B. With the captured ``inputs`` (X [T, in] per call) each row is scaled so that
    rms(a_new.x) equals a Kaiming row's; without them, to the Kaiming row's norm. The scale is
    reduced over processes, so under torch.distributed every process passes its list, empty
    where the layer did not run on its batches (routed experts); None only on all of them.
    ``failure``: the decision's :class:`lorambo.distributed.SharedFailure`; each step then runs
    under it and the scale's collective carries its flag, so a process that failed (here or
    before) still joins that collective, and every process raises there; a check after the rows'
    copy does the same for a failure in the steps after that collective. Every process then takes
    its growth back.
    """
    n = new_rank - layer.rank
    if directions is not None and n > 0 and directions.shape[1] < n:
        raise ValueError(f"{layer._label}: {directions.shape[1]} directions for {n} new ranks")

    def local(fn, *args):
        return fn(*args) if failure is None else failure.run(fn, *args)

    old = local(lambda: layer.set_rank(new_rank, optimizer=optimizer, generator=generator))
    if directions is not None and n > 0:
        try:  # the aligned rows need temporaries: out of memory, or Ctrl-C, takes the growth back
            def unit_rows(start):
                rows = layer.lora_A[start:new_rank]
                d = directions[:, :n].T.to(rows.device, rows.dtype)                 # (n, in)
                return rows, rows.norm(dim=1, keepdim=True), d / d.norm(dim=1, keepdim=True).clamp_min(1e-30)

            aligned = local(unit_rows, old)                                         # rows, norms (n, 1), d
            if inputs is not None:  # an empty list still joins the collective of the others
                ratio = _activation_ratio(inputs, None if aligned is None else aligned[2], failure,
                                          n, layer.lora_A.dtype, layer.lora_A.device)
                aligned = local(lambda a, r: (a[0], a[1] * r, a[2]), aligned, ratio)
            local(lambda a: a[0].copy_(a[2] * a[1]), aligned)
            if failure is not None:
                # a process whose step after the collective failed (the ratio, the rows' copy): all
                # raise here and take the growth back; the others would keep it, or wait for it
                failure.check()
        except BaseException:
            if old is not None:
                layer.set_rank(old, optimizer=optimizer)  # new slots, their gradients and state: zero again
            raise
    return old


def _activation_ratio(inputs: Sequence[torch.Tensor], d: torch.Tensor | None, failure: SharedFailure | None = None,
                      n: int = 0, pool_dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """rms over tokens of a random unit row's response / that of each unit row of ``d`` [n, in],
    as [n, 1] (1 where a direction sees no input at all). Under ``failure`` (see
    :func:`grow_layer`) ``d`` is None where this process failed before: it still joins the
    collective, which raises on every process; ``n``, ``pool_dtype`` and ``device`` (those of
    the rows ``d`` is for) shape its stand-in. A failure after the collective is held back:
    None is returned."""
    def local_sums(d):
        dtype = torch.promote_types(d.dtype, torch.float32)
        d = d.to(dtype)
        sums = torch.zeros(d.shape[0] + 1, dtype=dtype, device=d.device)
        with autocast_off(d.device.type):  # a decision taken under autocast: products in float32 all the same
            for x in inputs:
                x = x.to(d.device, dtype)
                sums[:-1] += (x @ d.T).square().sum(0)                         # sum_t (d_j . x_t)^2
                sums[-1] += x.square().sum() / x.shape[1]                      # mean over unit rows
        return sums

    def from_sums(sums):
        along, random = sums[:-1], sums[-1]
        ratio = torch.where(along > 0, (random / along.clamp_min(1e-300)).sqrt(), torch.ones_like(along))
        return ratio.to(d.dtype).unsqueeze(1)

    if failure is None:
        return from_sums(all_reduced_mean(local_sums(d)))
    dtype = torch.promote_types(pool_dtype, torch.float32)
    # after the collective: a failure is held back too, for grow_layer's last check
    return failure.run(from_sums, failure.mean(failure.run(local_sums, d), n + 1, dtype, device))


def layer_benefits_many(layers: Mapping, pairs: Mapping, ks: Mapping[str, int], niter: int,
                        oversample: int, seed: int, step, indices: Mapping[str, int],
                        curvature: Mapping[str, float] | None = None, loss_scale: float = 1.0,
                        failure: SharedFailure | None = None
                        ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """({name: marginal gains of its next ``ks[name]`` ranks}, {name: directions [in, k]}) for
    every layer of ``ks`` from one lockstep power iteration over all of them (one grouped product
    and one collective per step, one host transfer in all: see ``benefits``). The captured dY
    carry ``loss_scale`` (a GradScaler's scale); the gains are in units of the unscaled loss.
    ``failure``: the decision's, which the power iteration's collectives carry."""
    names = list(ks)
    if not names:
        return {}, {}
    curvature = curvature or {}
    for name in names:
        h = curvature.get(name)
        if h is not None and not (float_value(h) > 0 and math.isfinite(float_value(h))):
            raise ValueError(f"curvature of layer {layers[name].name!r} is {shown_number(h)}: must be finite and > 0")
    dtype = torch.float32
    for name in names:
        dtype = torch.promote_types(dtype, layers[name].lora_A.dtype)
    a_cols, b_cols = [], []
    for name in names:
        layer = layers[name]
        a_cols.append(layer.lora_A[:layer.rank].detach().T)                     # (in, r)
        b_cols.append(layer.lora_B[:, :layer.rank].detach())                    # (out, r)
    gens = [decision_generator(seed, "grow", step, indices[n]) for n in names]
    seeds = [int(torch.randint(0, 2**62, (), generator=decision_generator(seed, "grow-kernel", step, indices[n])))
             for n in names]
    device = layers[names[0]].lora_A.device
    with autocast_off(device.type):  # a decision taken under autocast would multiply in its dtype
        sigmas, _, vectors = projected_top_singular_many(
            [pairs[n] for n in names], [layers[n].in_features for n in names],
            [layers[n].out_features for n in names], [ks[n] for n in names], a_cols, b_cols, niter,
            oversample, gens, seeds, dtype, device, failure=failure)
    gains, dirs = {}, {}
    for i, name in enumerate(names):
        # dividing the singular values, not dY, keeps fp16 dY from underflowing
        g = sigmas[i, :vectors[i].shape[1]].numpy() / loss_scale
        h = curvature.get(name)
        gains[name] = g * g / (2.0 * h) if h is not None else g
        dirs[name] = vectors[i]
    return gains, dirs


def check_grad_scaler(grad_scaler, caller: str) -> None:
    """TypeError naming ``caller`` unless ``grad_scaler`` is None or a GradScaler (duck-typed:
    ``get_scale`` and ``is_enabled``)."""
    if grad_scaler is not None and not (hasattr(grad_scaler, "get_scale") and hasattr(grad_scaler, "is_enabled")):
        raise TypeError(f"{caller}: grad_scaler={grad_scaler!r:.60} must be a torch.amp.GradScaler or None")


def loss_scale_of(grad_scaler) -> float:
    """The loss scale a GradScaler's last ``scale(loss)`` used (1.0 for None or a disabled one)."""
    check_grad_scaler(grad_scaler, "update_ranks")
    if grad_scaler is None or not grad_scaler.is_enabled():
        return 1.0
    scale = float(grad_scaler.get_scale())  # one host read per decision
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"grad_scaler's scale is {scale!r}: must be finite and > 0")
    return scale


def _int_at_least(what: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what}={value!r} must be an int >= {minimum}")
    return int(value)


def _not_nan(what: str, value, none_ok: bool = False) -> float | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float_value(value)):
        raise ValueError(f"{what}={value!r} must be a real number (not NaN)" + (" or None" if none_ok else ""))
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range (10**400): Python's error names nothing
        raise ValueError(f"{what}={shown_number(value)} is beyond the float range; give a float "
                         "(math.inf: nothing passes)") from None


def check_growth_settings(threshold=0.0, sketch_rank=4, power_iters=4, oversample=4,
                          move_threshold=None, max_moves=1, max_tokens=None) -> None:
    """ValueError naming the setting unless :class:`OnlineGrowth` can use it as given. A NaN
    threshold would refuse every gain (no growth, silently), ``sketch_rank=0`` likewise; int()
    would truncate 2.5 to 2; a negative oversample would estimate fewer directions than asked."""
    _not_nan("loss_improvement_threshold", threshold)
    _not_nan("move_threshold", move_threshold, none_ok=True)
    _int_at_least("sketch_rank", sketch_rank, 1)
    _int_at_least("power_iters", power_iters, 0)
    _int_at_least("oversample", oversample, 0)
    _int_at_least("max_moves", max_moves, 1)
    if max_tokens is not None:
        _int_at_least("max_tokens", max_tokens, 1)


class OnlineGrowth:
    """One online decision = estimate benefits from the captured step, grow, optionally move.

    Args:
        layers: ``{name: LoRAMBoLinear}`` that may change rank.
        budget: parameter budget ``sum r_i (d_i + k_i)`` that growth never exceeds.
        threshold: ``loss_improvement_threshold``; a new rank is added only if its gain exceeds it.
        sketch_rank: most ranks one layer can gain per decision (singular pairs estimated).
        power_iters, oversample: randomized power iteration settings (4 + 4 reach a few percent
            on gradients with any spectral decay; the test checks agreement with a dense SVD).
        seed: seeds the sketches and new-slot inits (with step and layer index: DDP-identical).
        move_threshold: enable rank moves; a component whose score is below it may be removed to
            fund a layer with a gain above ``threshold``. Scores are passed to :meth:`update`.
            A rank is paid by one component or several (:mod:`lorambo.allocation.move_plan`:
            cheap layers can fund a dearer one). Moves go one way per layer
            (:mod:`lorambo.allocation.move_directions`): a layer that has received by a move
            gives nothing, and one that has given is not grown again.
        max_moves: moves per decision (ranks received; each may take several
            components).
        curvature: optional ``{name: h_i > 0}``; gains become ``Delta^2 / (2 h_i)``.
        log: a :class:`lorambo.allocation.report.DecisionLog` receiving every decision; the
            way each layer's rank has gone is read from it (None: an in-memory one of its own).
        max_tokens: rows of X / dY kept per layer call (see :class:`ActivationCapture`).
        min_rank: rank moves never take a layer below it.
        max_rank: growth never takes a layer above it (nor above its capacity); None: capacity only.
    """

    def __init__(self, layers: Mapping, budget: int, threshold: float = 0.0, sketch_rank: int = 4,
                 power_iters: int = 4, oversample: int = 4, seed: int = 0,
                 move_threshold: float | None = None, max_moves: int = 1,
                 curvature: Mapping[str, float] | None = None, log=None, max_tokens: int | None = None,
                 min_rank: int = 0, max_rank: int | None = None):
        check_growth_settings(threshold, sketch_rank, power_iters, oversample, move_threshold,
                              max_moves, max_tokens)
        check_rank_bounds(min_rank, max_rank)
        self.min_rank, self.max_rank = int(min_rank), None if max_rank is None else int(max_rank)
        if not (is_finite_number(budget) and budget >= 0):
            raise ValueError(f"budget={shown_number(budget)} must be a finite number of parameters >= 0")
        self.layers = dict(layers)
        self.positions = {n: i for i, n in enumerate(self.layers)}  # a layer's seed index, O(1) per grow
        self.costs = {n: m.in_features + m.out_features for n, m in self.layers.items()}
        self.budget, self.threshold = int(budget), float(threshold)
        self.sketch_rank, self.power_iters, self.oversample = int(sketch_rank), int(power_iters), int(oversample)
        self.seed, self.move_threshold, self.max_moves = int(seed), move_threshold, int(max_moves)
        self.curvature = dict(curvature or {})
        self.log = DecisionLog() if log is None else log  # in memory: the moves' ways are read from it
        self.capture = ActivationCapture(self.layers, max_tokens)

    def spent(self) -> int:
        return sum(self.costs[n] * m.rank for n, m in self.layers.items())

    def _top(self, layer) -> int:
        """The highest rank growth may reach: the capacity, or ``max_rank`` below it."""
        return layer.capacity if self.max_rank is None else min(layer.capacity, self.max_rank)

    @warns_when_done  # a warning raised as an error must not stop a decision half-way
    def update(self, step=None, optimizer=None, component_scores: Mapping | None = None,
               grad_scaler=None) -> list[dict]:
        """Take one decision from the captured activations, apply it in place, return records.

        ``grad_scaler``: the ``torch.amp.GradScaler`` whose scaled loss the captured backward ran
        on (call before ``scaler.update()``); gains are then compared with ``threshold`` in units
        of the unscaled loss, as without AMP. None: the loss was not scaled."""
        # everything that can stop a decision is checked before its first rank change: a refusal
        # midway left earlier layers grown, unlogged, and the capture gone. A refusal on one
        # process reaches the others through the decision's first collective, which they would
        # otherwise wait in forever, and so do settings that differ between processes.
        failure = SharedFailure("update_ranks")
        with failure:
            loss_scale = loss_scale_of(grad_scaler)
            failure.settings = self._settings(step, loss_scale)
            if not self.capture.has_data():
                raise RuntimeError(f"update_ranks: {self.capture.missing_data(step)}")
            if self.move_threshold is not None and component_scores is None:
                raise ValueError("rank moves (move_threshold set) need component_scores={name: scores}")
            merged = [n for n, m in self.layers.items() if m.merged]
            if merged:
                raise RuntimeError(f"update_ranks: layer(s) {merged[:4]} are merged; unmerge() them before a "
                                   "rank decision (nothing was changed, the captured step is kept)")
            scores = None if self.move_threshold is None else self._checked_scores(component_scores)
            optimizer = optimizer_argument(optimizer, "update_ranks")
            for layer in self.layers.values():
                check_slot_state_editable(optimizer, layer)
        finite = self._captured_finite(failure)
        records: list[dict] = []
        try:
            if not finite:
                # an overflowed step (GradScaler skips it too) says nothing about where rank helps
                warn_user(f"step {step}: the captured activations or output gradients are not finite "
                          "(NaN/inf): no rank decision is taken at this step", RuntimeWarning)
                return []
            frozen = set(frozen_layers(self.layers))  # neither grow nor give (allocation/frozen.py)
            received, gave = move_directions(self.log.records)
            ks = {n: min(self.sketch_rank, self._top(m) - m.rank) for n, m in self.layers.items()
                  if self._top(m) > m.rank and n not in frozen and n not in gave}
            gains, dirs = layer_benefits_many(
                self.layers, {n: self.capture.pairs(n) for n in ks}, ks, self.power_iters,
                self.oversample, self.seed, step, self.positions,
                self.curvature, loss_scale, failure)
            room = {n: self._top(m) - m.rank for n, m in self.layers.items()}
            plan = plan_growth(gains, self.costs, room, self.budget - self.spent(), self.threshold)
            for n, add in plan.items():
                records.append(self._grow(step, n, add, gains, dirs, optimizer, "grow", failure))
            if scores is not None:
                self._move(step, plan, gains, dirs,
                           {n: s for n, s in scores.items() if n not in frozen and n not in received},
                           optimizer, records, failure)
            failure.check()  # a process that failed after the decision's last collective: all raise
        except BaseException as err:  # out of memory in one layer's growth, Ctrl-C: the rank changes made stay
            note_rank_changes_kept(err, f"update_ranks (step {step})", records,
                                   " and are in the decisions and the decision log", "decision")
            raise
        finally:
            self.capture.clear()
            self.log.extend(records)
        return records

    def _settings(self, step, loss_scale) -> dict:
        """What a decision is taken from besides the captured statistics: every process must
        have the same, or their decisions (and rank pools) would part."""
        return {"step": step, "budget": self.budget, "threshold": self.threshold,
                "sketch_rank": self.sketch_rank, "power_iters": self.power_iters,
                "oversample": self.oversample, "seed": self.seed, "move_threshold": self.move_threshold,
                "max_moves": self.max_moves, "min_rank": self.min_rank, "max_rank": self.max_rank,
                "curvature": self.curvature, "loss_scale": loss_scale,
                "ranks": {n: (m.rank, m.capacity) for n, m in self.layers.items()},
                "frozen": frozen_layers(self.layers)}

    def _captured_finite(self, failure: SharedFailure) -> bool:
        """Whether every captured X and dY is finite on every process (one flag all-reduced, so
        all processes skip or decide together; one host read for the whole decision). The same
        collective carries ``failure``'s flag: raises on every process when one failed."""
        per_device: dict[torch.device, list[torch.Tensor]] = {}
        for n in self.layers:
            for pair in self.capture.pairs(n):
                for t in pair:
                    per_device.setdefault(t.device, []).append(torch.isfinite(t).all().logical_not().reshape(1))
        nonfinite = torch.zeros(1, dtype=torch.float64)
        for flags in per_device.values():
            nonfinite += torch.cat(flags).sum().to("cpu", torch.float64)
        (nonfinite,) = failure.sum_and_check(nonfinite)
        return nonfinite == 0.0

    def _grow(self, step, name, add, gains, dirs, optimizer, reason, failure, first=0) -> dict:
        layer = self.layers[name]
        gen = decision_generator(self.seed, "init", step, self.positions[name], reason)
        inputs = [x for x, _ in self.capture.pairs(name)]
        old = grow_layer(layer, layer.rank + add, dirs[name][:, first:first + add], optimizer, gen, inputs, failure)
        got = [float(g) for g in gains[name][first:first + add]]
        return {"step": step, "event": "grow", "reason": reason, "layer": name, "benefit": got[0],
                "gains": got, "old_rank": old, "new_rank": layer.rank, "spent": self.spent(),
                "budget": self.budget}

    def _checked_scores(self, scores: Mapping) -> dict[str, torch.Tensor]:
        """``component_scores`` as float64 CPU tensors, one finite score per active slot of each
        layer given (ranks before the decision), else ValueError naming the layer."""
        unknown = [n for n in scores if n not in self.layers]
        if unknown:
            raise ValueError(f"component_scores for unknown layers {unknown!r}")
        names = [n for n in self.layers if n in scores]
        given = [torch.as_tensor(scores[n], dtype=torch.float64) for n in names]
        # one host copy for all layers
        flat = (torch.cat([s.reshape(-1).to(given[0].device) for s in given]).cpu() if given
                else torch.zeros(0, dtype=torch.float64))
        out, pos = {}, 0
        for n, s in zip(names, given):
            values = flat[pos:pos + s.numel()]
            if s.shape != (self.layers[n].rank,) or not bool(torch.isfinite(values).all()):
                raise ValueError(f"component_scores[{n!r}] must be {self.layers[n].rank} finite numbers "
                                 f"(its rank), got {s!r}")
            out[n], pos = values, pos + s.numel()
        return out

    def _move(self, step, plan, gains, dirs, scores, optimizer, records: list[dict], failure) -> None:
        """Take the moves, appending a record to ``records`` for each rank change as it is made."""
        names = [n for n in self.layers if n not in plan and n in scores]  # grown layers don't shrink
        given = [scores[n] for n in names]
        # one broadcast for all layers: process 0's scores, identical decisions
        flat = torch.cat(given) if given else torch.zeros(0, dtype=torch.float64)
        flat = failure.broadcast(flat.contiguous(), flat.numel(), torch.float64, flat.device).numpy()
        usable, pos = {}, 0
        for n, s in zip(names, given):
            usable[n] = flat[pos:pos + s.numel()]
            pos += s.numel()
        nxt, room = {}, {}
        for n, g in gains.items():
            used = plan.get(n, 0)
            if used < len(g) and self.layers[n].rank < self._top(self.layers[n]):
                nxt[n], room[n] = float(g[used]), 1
        spare = {n: max(self.layers[n].rank - self.min_rank, 0) for n in names}
        moves = plan_moves(nxt, usable, self.costs, room, self.budget - self.spent(), self.threshold,
                           float(self.move_threshold), self.max_moves, spare)
        dropped = {}
        for donor, comp, _ in moves:
            dropped.setdefault(donor, []).append(comp)
        before = {d: self.layers[d].rank for d in dropped}
        spent = self.spent()
        donors = [self.layers[d] for d in dropped]
        # every process shrinks the donors or none does: one that could not (out of memory) would
        # otherwise leave the others with other ranks
        kept = (failure.run(lambda: EditSnapshot.of_pools(donors, each_optimizer(optimizer)))
                if world_size() > 1 else None)
        try:
            failure.run(lambda: keep_components_many(
                [(self.layers[d], [k for k in range(self.layers[d].rank) if k not in comps])
                 for d, comps in dropped.items()], optimizer))
            if dropped:
                failure.check()
        except BaseException as err:
            if isinstance(err, Exception) and kept is not None:  # under DDP: raised on every process
                kept.restore()
                add_note(err, f"update_ranks (step {step}): the rank move's shrinks of {list(dropped)} were taken "
                              "back on every process")
            raise
        finally:  # each layer is shrunk whole or not at all (stopped part-way): record those that were
            for donor, comps in dropped.items():
                if self.layers[donor].rank != before[donor]:
                    # the spend after this record's change, as a grow record's: the donors shrink in
                    # one pass, and self.spent() here would already count the donors logged after it
                    spent -= self.costs[donor] * (before[donor] - self.layers[donor].rank)
                    records.append({"step": step, "event": "shrink", "reason": "move", "layer": donor,
                                    "components": comps, "scores": [float(usable[donor][k]) for k in comps],
                                    "old_rank": before[donor], "new_rank": self.layers[donor].rank,
                                    "spent": spent, "budget": self.budget})
        for recv in dict.fromkeys(r for _, _, r in moves):  # paid by one component or several
            records.append(self._grow(step, recv, 1, gains, dirs, optimizer, "move", failure, plan.get(recv, 0)))

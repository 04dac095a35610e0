"""Exact Hessian-vector products by double backward, several probes per autograd pass.

For the loss L(W_1..W_L) and a block probe v = (v_1..v_L), (Hv)_i = sum_j H_ij v_j is the
vector-Jacobian product of the gradient g = dL/dW with v: grad(g, W, grad_outputs=v) — the same
as grad(<g, v>, W), never a dense Hessian. ``is_grads_batched=True`` runs that backward once under
vmap for P probes stacked on a leading dimension instead of P Python-level backward calls.

Loss over batches: the operator is the Hessian of the *mean* loss over all batches (each batch
weighted equally, across ranks too): per pass every batch is forwarded and differentiated once,
the (summarised) products are summed over batches and divided by the batch count. The target is
then one fixed matrix, so the reported standard errors are pure probe noise and everything is
deterministic for a fixed seed. Cost per pass: one forward + backward per batch plus one
(vmapped) double backward; the first two are amortised over the P probes of the pass.

vmap or loop (``batched``; both give the same numbers): the loop runs P double backwards over
the pass's one retained graph. Measured on a 2-layer, 128-wide GPT-2 (batch 4x64, fp32, 32
probes, 2-core CPU, 4 runs): loop 26-27 ms/probe, vmap 28-33 ms/probe, a full
forward+backward+double backward per probe 43-49 ms/probe -- on CPU vmap buys nothing over the
shared-graph loop. On an H100
(docs/performance.md, 6-layer 512-wide GPT-2) vmap took 375 ms for 16 probes vs 479 ms looped. So
batched=None means vmap on accelerators and the loop on CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch

from .attention import double_backward_attention
from lorambo.distributed import SharedFailure, all_reduce_sum_
from .inputs import NonFiniteProducts, check_some_batches, compute_loss, no_gradient_error, non_finite_loss_message
from lorambo.user_warnings import warn_user

__all__ = ["HessianOperator"]

Summary = list  # list of tensors, linear in the Hessian-vector products


class HessianOperator:
    """H = Hessian of mean_b loss_fn(model, b) w.r.t. ``weights`` (which must require grad).

    batched=True uses is_grads_batched; if vmap fails for this model (e.g. an autograd.Function
    whose backward reads values with .item() on the double-backward path) it warns once and
    loops over probes. batched=None: True unless the weights live on the CPU. ``names`` label
    the weights in errors (RuntimeError when the loss gives none of them a gradient), ``who``
    the estimator in errors (about what loss_fn returned, too). ``settings``: what every process
    must pass the same (the estimator's arguments, the names included), checked in each
    :meth:`apply`'s first collective (see :class:`lorambo.distributed.SharedFailure`).
    """

    def __init__(self, model, loss_fn, batches: Sequence, weights: Sequence[torch.Tensor],
                 batched: bool | None = None, names: Sequence[str] | None = None,
                 who: str = "Hessian-vector products", settings=None):
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.who, self.settings = who, settings
        self.weights = list(weights)
        self.names = list(names) if names is not None else [f"weight {i}" for i in range(len(self.weights))]
        if batched is None:
            batched = self.weights[0].device.type != "cpu"
        self.batched = batched
        self._warned_constant = False
        self._losses: list[torch.Tensor] = []  # this process's batch losses in the latest apply

    @contextmanager
    def naming_the_batch(self):
        """Re-raise :class:`NonFiniteProducts` naming the first batch (of this process) whose
        loss was NaN/inf in the latest :meth:`apply`: such a loss makes every product NaN, and
        only the losses say which batch it was. Checked only on the way out of an error: a host
        sync per batch would cost every call."""
        try:
            yield
        except NonFiniteProducts as err:
            bad = [i for i, loss in enumerate(self._losses) if not bool(torch.isfinite(loss))]
            if not bad:
                raise
            value = float(self._losses[bad[0]])
            raise NonFiniteProducts(f"{non_finite_loss_message(self.who, bad[0], value)}; {err}") from err

    def apply(self, vs: Sequence[torch.Tensor],
              summarize: Callable[[list[torch.Tensor]], Summary]) -> Summary:
        """Mean over batches (and ranks) of summarize([ (H_b v)_i for each layer i ]), summed in
        at least float32 (the products themselves are in the weights' dtype).

        vs[i]: [P, *weights[i].shape] probes. summarize gets the products in the same layout and
        must be linear in them (it is applied per batch and the results are averaged), so it can
        shrink them (e.g. to quadratic forms) before they are accumulated.
        """
        total = None
        reached = False
        self._losses = []
        failure = SharedFailure(self.who, self.settings)
        # create_graph records nothing under an outer no_grad(); fused attention kernels have no
        # double backward, so attention runs a path that has one (see ``attention``)
        with failure, torch.enable_grad(), double_backward_attention(self.model):
            for batch in self.batches:
                loss = compute_loss(self.loss_fn, self.model, batch, who=self.who)
                self._losses.append(loss.detach())
                grads = torch.autograd.grad(loss, self.weights, create_graph=True,
                                            allow_unused=True)
                reached = reached or any(g is not None for g in grads)
                part = summarize(self._products(grads, vs))
                # a NaN/inf loss makes its products NaN even where the Hessian is structurally 0
                # (a loss linear in the weights past a ReLU): the callers then skip or refuse
                # them, as for any non-finite product, instead of returning a silent 0. No host
                # sync, and under DDP the NaN reaches every process through the all-reduce.
                gate = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
                # summed over batches in at least float32: a bfloat16 running sum rounds every
                # addition to 8 bits, and past ~2/u batches (512 in bfloat16) stops growing
                part = [p.to(torch.promote_types(p.dtype, torch.float32)) * gate.to(p.device) for p in part]
                total = part if total is None else [t + p for t, p in zip(total, part)]
                del loss, grads
        # batches, failed processes and processes some weight got a gradient on, in the collective
        # that sums the batch count anyway: a process that raised or has no batches (it adds
        # zeros) cannot leave the others waiting in the collectives below
        count, reached_on = failure.sum_and_check(
            torch.tensor([float(len(self.batches)), float(reached)], dtype=torch.float64))
        check_some_batches(count, self.who)
        if not reached_on:  # every product would be 0: a silent zero Hessian for every layer
            raise no_gradient_error(self.who, self.names)
        if total is None:  # this process has no batches: it adds zeros of the summary's layout
            total = [torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32))
                     for t in summarize([torch.zeros_like(v) for v in vs])]
        return [all_reduce_sum_(t) / count for t in total]

    def _products(self, grads, vs) -> list[torch.Tensor]:
        num = vs[0].shape[0]
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        constant = [self.names[i] for i, g in enumerate(grads) if g is not None and not g.requires_grad]
        if constant and not self._warned_constant:
            # right for a loss linear in those weights; wrong for a custom autograd.Function whose
            # backward is not differentiable (detached gradients), which reads as a zero Hessian
            warn_user(f"Hessian-vector products: the gradients of {constant[:5]} do not depend on any "
                      "weight, so their Hessian blocks are 0. If the loss is not linear in them, a "
                      "custom autograd.Function on their path has a backward that is not differentiable",
                      RuntimeWarning)
            self._warned_constant = True
        outs = [None] * len(self.weights)
        if live:
            outputs = [grads[i] for i in live]
            cotangents = [vs[i] for i in live]
            if self.batched and num > 1:
                try:
                    outs = list(torch.autograd.grad(outputs, self.weights, cotangents,
                                                    retain_graph=True, allow_unused=True,
                                                    is_grads_batched=True))
                except (RuntimeError, NotImplementedError) as err:
                    if isinstance(err, torch.OutOfMemoryError):
                        raise
                    warn_user(
                        "batched Hessian-vector products (autograd.grad(is_grads_batched=True), "
                        f"i.e. vmap) failed for this model: {str(err).splitlines()[0]} -- falling "
                        "back to one double backward per probe (same results, slower)",
                        RuntimeWarning)
                    self.batched = False
            if not self.batched or num == 1:
                per_probe = [torch.autograd.grad(outputs, self.weights, [c[p] for c in cotangents],
                                                 retain_graph=True, allow_unused=True)
                             for p in range(num)]
                outs = [None if per_probe[0][i] is None
                        else torch.stack([pp[i] for pp in per_probe])
                        for i in range(len(self.weights))]
        # a weight the gradient does not depend on has a zero Hessian column block
        return [torch.zeros_like(v) if o is None else o.detach() for o, v in zip(outs, vs)]

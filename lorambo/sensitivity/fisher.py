"""Cheap curvature during training: the empirical-Fisher trace of each layer's weight.

For a layer y = x W^T, the gradient of example n's loss is g_n = c_n * dY_n^T X_n, where
X_n [T, in] and dY_n [T, out] are that example's inputs and output gradients (T tokens), and c_n
undoes the batch reduction of the loss: c = B for a mean over B examples, 1 for a sum, and
N / N_n for a mean over the N real tokens of the batch (Hugging Face's loss with ``labels``),
whose example n holds N_n of them: that loss weights example n's own token mean by N_n / N.
The empirical Fisher trace is Tr(F) = mean_n ||g_n||_F^2. Two exact ways to get ||g_n||^2
without keeping per-example gradients around:

    Gram trick     ||dY_n^T X_n||^2 = <X_n X_n^T, dY_n dY_n^T>      O(T^2 (in + out))
    materialise    ||dY_n^T X_n||^2 computed in chunks of examples  O(T in out)

The cheaper one is chosen per call (Gram when T (in + out) < in * out, i.e. short sequences
or wide layers). Both cost about as much as the layer's own GEMM, so for long sequences an
unbiased sketch is offered too (``sketch_dim=k``): with Rademacher v [in, k] (each example
its own), ||G_n||^2 = E ||G_n v||^2 / k and G_n v = dY_n^T (X_n v), which costs O(T k (in + out)),
a fraction k / min(T, ...) of the exact forms, at the price of variance that averages out over
training steps. Statistics stay on the device (no host sync per step); ``estimates()`` reads
them out once, all-reduced across ranks under torch.distributed.

Where :func:`lorambo.ops.sketch.use_sketch_kernels` allows it (CUDA tensors by default) the
Gram form runs in the grouped Gram kernel (one launch per call, symmetric token tiles once, no
T x T matrices in memory); ``estimates()`` reduces all layers with one collective and one host
copy.

Opt-in: nothing runs until :meth:`FisherProxy.attach` (or ``with FisherProxy(model):``).
Hooks capture x in the forward (a reference, no copy) and dY through a hook on the output
tensor, so they work for LoRAMBoLinear and plain Linear/Conv1D alike. A module called several
times per step (weight sharing: a layer applied twice in one forward) counts each call's
examples as examples of their own: the trace is the mean over calls and examples of
||g_{n,c}||^2, not of ||sum_c g_{n,c}||^2 (the cross terms between calls are not formed), and
``num_probes`` counts calls x examples.

Several backward passes through one forward (``retain_graph=True``, one loss per task) are one
gradient, as in ``.grad``: a call's dY are summed over them and its examples counted once. Passes
that do not accumulate into the layer's ``.grad`` (``torch.autograd.grad``: a gradient penalty,
an input gradient, a Hessian-vector product) are left out (:mod:`lorambo.nn.grad_passes`). A call
is folded in when a pass frees its graph; one whose last pass kept it (``retain_graph=True``,
``create_graph=True``) when that graph is gone (the next forward of a measured layer folds it,
or :meth:`FisherProxy.detach`), or at :meth:`FisherProxy.estimates`: a pass through a kept graph
after that counts its examples again. :meth:`FisherProxy.state_dict` saves such a call as if it
ended there and leaves it open. Under reentrant activation checkpointing each pass
recomputes the segment; the copies of a call that one node recomputes are that one call.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.amp.grad_scaler import GradScaler

from lorambo.ops.custom_op import autocast_off
from lorambo.ops.sketch import sq_grad_norms_many, use_sketch_kernels

from lorambo.distributed import SharedFailure
from lorambo.model.argument import require_module
from lorambo.nn.finite_numbers import is_finite_number
from lorambo.nn.grad_passes import CallParameters, accumulator_nodes, pass_feeds_grad
from lorambo.nn.hook_inputs import layer_input
from lorambo.nn.local_hooks import LocalHook
from .estimate import Estimate
from .example_weights import ExampleWeights
from .targets import find_targets
from .token_mask import TokenMask, check_token_mask
from lorambo.user_warnings import warn_user

__all__ = ["FisherProxy", "per_example_sq_grad_norms", "sketched_sq_grad_norms"]

_STATE_VERSION = 1  # of FisherProxy.state_dict
_CHUNK_ELEMENTS = 1 << 24  # per-example gradients materialised at most ~16M elements at a time


class _Call:
    """One training forward of a measured layer: its input, its examples' weights c_n^2, and the
    summed dY of the backward passes through it so far (with the loss scale they carry)."""

    __slots__ = ("name", "x", "weights", "grad", "scale", "hook", "released", "key")

    def __init__(self, name: str, x: torch.Tensor, weights: torch.Tensor | None):
        self.name, self.x, self.weights = name, x, weights
        self.grad: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.hook = None  # a weak reference to the gradient hook on the call's output
        self.released = False  # that hook is gone: no backward pass can reach the call any more
        self.key = None  # (node, layer, order) of a call recomputed by reentrant checkpointing


def _examples(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B, ..., features] as [B, T, features], T the product of the middle dims. Spelled out,
    not ``-1``: reshape cannot infer it for an empty batch (B = 0) or empty sequences (T = 0)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def per_example_sq_grad_norms(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """||dY_n^T X_n||_F^2 for every example n: x [B, T, in] (or [B, in]), grad_y [B, T, out].

    Accumulates in at least float32. Returns a [B] tensor.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    x, grad_y = x.to(acc), grad_y.to(acc)
    if x.dim() == 2:  # one token per example: ||dy x^T||^2 = ||x||^2 ||dy||^2
        return x.square().sum(-1) * grad_y.square().sum(-1)
    x, grad_y = _examples(x), _examples(grad_y)  # (B, T, in), (B, T, out)
    b, t, d_in = x.shape
    d_out = grad_y.shape[-1]
    if t * (d_in + d_out) < d_in * d_out:
        gram_x = x @ x.transpose(1, 2)  # (B, T, T)
        gram_y = grad_y @ grad_y.transpose(1, 2)  # (B, T, T)
        return (gram_x * gram_y).sum((1, 2))
    chunk = max(1, _CHUNK_ELEMENTS // (d_in * d_out))
    return torch.cat([(grad_y[i:i + chunk].transpose(1, 2) @ x[i:i + chunk]).square().sum((1, 2))
                      for i in range(0, max(b, 1), chunk)])  # one (empty) chunk for B = 0


def sketched_sq_grad_norms(x: torch.Tensor, grad_y: torch.Tensor, sketch_dim: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased estimate of ||dY_n^T X_n||_F^2 per example from ``sketch_dim`` Rademacher probes
    of its own: examples sharing probes would share their sketch errors, which the spread over
    examples (the estimates' stderr) would then not show."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x, grad_y = _examples(x).to(acc), _examples(grad_y).to(acc)  # (B, T, in), (B, T, out)
    shape = (x.shape[0], x.shape[-1], sketch_dim)
    v = torch.randint(0, 2, shape, generator=generator, device=x.device).to(acc) * 2 - 1  # (B, in, k)
    projected = grad_y.transpose(1, 2) @ (x @ v)  # (B, out, k) = G_n v_n
    return projected.square().sum((1, 2)) / sketch_dim


def _exact_sq_grad_norms(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """:func:`per_example_sq_grad_norms`; through the Gram kernel (``lorambo.ops.sketch``) where
    it runs (CUDA by default) and the Gram trick is the cheaper exact form."""
    if x.dim() > 2 and x.dtype == grad_y.dtype and use_sketch_kernels([x, grad_y]):
        x3, g3 = _examples(x), _examples(grad_y)  # (B, T, in), (B, T, out)
        t, d_in, d_out = x3.shape[1], x3.shape[2], g3.shape[2]
        if t * (d_in + d_out) < d_in * d_out:
            return sq_grad_norms_many([x3], [g3])[0]
    return per_example_sq_grad_norms(x, grad_y)


class FisherProxy:
    """Per-layer empirical-Fisher traces gathered from normal training steps.

    Args:
        model: the model being trained.
        modules: layer names (default: every LoRA layer, else every Linear/Conv1D but the head).
        sketch_dim: None for exact per-example norms; k for the cheaper unbiased sketch.
        seed: seed of the sketch probes.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 run. Its loss scale S multiplies
            every dY, so without it the traces come out S^2 times too large (and drift as S
            changes); with it each step's statistics are divided by that step's S^2, on the
            device. Examples made non-finite by an overflow step are left out (and reported).
        reduction: how the training loss reduces over the examples of a batch, ``"mean"``
            (g_n = B dY_n^T X_n), ``"sum"``, or ``"token_mean"``: a mean over the real tokens
            of the whole batch (g_n = N / N_n dY_n^T X_n), as Hugging Face's loss with
            ``labels``, for which the example of loss is each sequence's own token mean; the
            traces then do not depend on padding or batching. Examples are the leading dim of a
            layer input with 3 or more dims, and each row of a 2-D input.
        token_mask: for ``"token_mean"``, which tokens the loss averages over, read from the
            keyword arguments of each model call (``model(**batch)``, as Trainer calls it):
            ``"auto"`` takes their ``attention_mask``, a callable gets them and returns a [B, T]
            mask (only its per-example counts are used, so a causal LM's shifted labels can be
            ``lambda b: b["labels"][:, 1:] != -100``). See :mod:`lorambo.sensitivity.token_mask`.
        loss_multiplier: the constant the training loop multiplies each batch's reduced loss by
            before its backward: ``1 / k`` when k micro-batches accumulate into one step and each
            loss is divided by k (as transformers' Trainer does without ``num_items_in_batch``).
            It multiplies every dY, so each ||g_n||^2 is divided by its square; left at 1, the
            traces come out k^2 times too small (the same factor for every layer: allocations
            do not change).

    Use ``with FisherProxy(model) as fisher: ...train...`` then ``fisher.estimates()``, which
    gives ``{name: Estimate(value=Tr(F_i), stderr, num_probes=examples seen)}``.
    :meth:`state_dict` / :meth:`load_state_dict` resume a measurement across processes.
    """

    def __init__(self, model: torch.nn.Module, modules: Sequence[str] | str | None = None, reduction: str = "mean",
                 sketch_dim: int | None = None, seed: int = 0, grad_scaler: GradScaler | None = None,
                 token_mask: TokenMask = "auto", loss_multiplier: float = 1.0) -> None:
        require_module(model, "FisherProxy")
        if not is_finite_number(loss_multiplier) or not loss_multiplier > 0:
            raise ValueError(f"FisherProxy: loss_multiplier must be a finite number > 0, got {loss_multiplier!r}")
        if grad_scaler is not None and not callable(getattr(grad_scaler, "_get_scale_async", None)):
            raise TypeError(f"FisherProxy: grad_scaler must be a torch.amp.GradScaler, got "
                            f"{type(grad_scaler).__name__}")
        if reduction not in ("mean", "sum", "token_mean"):
            raise ValueError(f"FisherProxy: reduction must be 'mean', 'sum' or 'token_mean', got {reduction!r}")
        check_token_mask(token_mask, "FisherProxy")
        if sketch_dim is not None and (isinstance(sketch_dim, bool) or not isinstance(sketch_dim, numbers.Integral)
                                       or sketch_dim < 1):
            raise ValueError(f"FisherProxy: sketch_dim must be a positive int or None, got {sketch_dim!r}")
        self.reduction = reduction
        self.sketch_dim = None if sketch_dim is None else int(sketch_dim)
        self._seed = seed
        self.grad_scaler = grad_scaler
        self.loss_multiplier = float(loss_multiplier)
        self.targets = find_targets(model, modules)
        self._model = model
        self._example_weights = ExampleWeights(token_mask) if reduction == "token_mean" else None
        self._handles: list = []
        self._call_params = CallParameters()  # the parameters each call used (grad_passes.py)
        self.reset()

    def reset(self) -> None:
        """Forget everything gathered so far, and restart the sketch probes from ``seed``: a
        reset proxy measures as a new one does (the same batches give the same estimates)."""
        self._generators: dict = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._sum_sq: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {t.name: 0 for t in self.targets}
        self._nonfinite: dict[str, torch.Tensor] = {}
        self._empty: dict[str, torch.Tensor] = {}  # token_mean: examples without a real token, not examples
        self._pending: dict[int, _Call] = {}  # calls whose graph a backward retained, not folded in yet
        self._recomputed: dict[tuple, _Call] = {}  # reentrant checkpointing's calls, by (node, layer, order)
        self._recompute_task, self._recompute_order = None, {}

    def _settings(self) -> dict:
        """What the statistics depend on besides the batches: a state gathered under others would
        not add up with these (and processes must share them, see :meth:`estimates`)."""
        return {"targets": [t.name for t in self.targets], "reduction": self.reduction,
                "sketch_dim": self.sketch_dim, "seed": self._seed}

    def state_dict(self) -> dict[str, Any]:
        """What resuming the measurement needs: the statistics gathered so far and the sketch
        probes' generator states, with the settings they were gathered under. Plain data and CPU
        tensors: ``torch.load(..., weights_only=True)`` reads it. A call whose graph a backward
        kept is in it as if it ended now, and stays open here: a later pass through it adds to
        the same call, as without the save."""
        def cpu(table):
            return {n: t.detach().to("cpu", torch.float64).clone() for n, t in table.items()}

        kept = self._statistics()
        try:
            for call in self._pending.values():  # what _fold would add, leaving the call open
                if call.grad is not None:
                    self._accumulate(call.name, call.x, call.grad, call.weights, call.scale)
            return {"version": _STATE_VERSION, "settings": self._settings(), "sum": cpu(self._sum),
                    "sum_sq": cpu(self._sum_sq), "count": dict(self._count), "nonfinite": cpu(self._nonfinite),
                    "empty": cpu(self._empty),
                    "generators": {str(d): g.get_state() for d, g in self._generators.items()}}
        finally:
            self._restore_statistics(kept)

    def _statistics(self) -> tuple:
        """A copy of everything :meth:`_accumulate` changes (sums, counts, probe generators)."""
        return ({n: t.clone() for n, t in self._sum.items()}, {n: t.clone() for n, t in self._sum_sq.items()},
                dict(self._nonfinite), dict(self._empty), dict(self._count),
                {d: (g, g.get_state()) for d, g in self._generators.items()})

    def _restore_statistics(self, kept: tuple) -> None:
        self._sum, self._sum_sq, self._nonfinite, self._empty, self._count, generators = kept
        for generator, state in generators.values():
            generator.set_state(state)
        self._generators = {d: g for d, (g, _) in generators.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next backward passes add to its statistics and
        draw the probes a proxy that had gone on would draw. A state of other settings, or not
        one of a FisherProxy, is a ValueError naming what differs, and nothing is changed."""
        where = "FisherProxy.load_state_dict"
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{where}: not a FisherProxy state of version {_STATE_VERSION} (got {got!r})")
        missing = [k for k in ("settings", "sum", "sum_sq", "count", "nonfinite", "generators") if k not in state]
        if missing:
            raise ValueError(f"{where}: state without {missing}")
        have = self._settings()
        differ = {k: (state["settings"].get(k), v) for k, v in have.items() if state["settings"].get(k) != v}
        if differ:
            raise ValueError(f"{where}: the state was gathered with other settings (setting: (saved, here)) {differ}")
        names = set(have["targets"])
        state = {**state, "empty": state.get("empty", {})}  # states saved before it was kept: none
        for key in ("sum", "sum_sq", "nonfinite", "empty", "count"):
            unknown = [n for n in state[key] if n not in names]
            if unknown:
                raise ValueError(f"{where}: state[{key!r}] names layers {unknown[:4]} this proxy does not measure")
        devices = {t.name: t.weight.device for t in self.targets}
        generators = {}
        for device, gen_state in state["generators"].items():
            generators[torch.device(device)] = torch.Generator(device=device)
            generators[torch.device(device)].set_state(gen_state)
        tables = {key: {n: torch.as_tensor(v, dtype=torch.float64).to(devices[n]) for n, v in state[key].items()}
                  for key in ("sum", "sum_sq", "nonfinite", "empty")}
        count = {n: int(state["count"].get(n, 0)) for n in have["targets"]}
        # everything read: now applied whole (calls still open belong to the statistics replaced)
        self._generators, self._count, self._pending, self._recomputed = generators, count, {}, {}
        self._sum, self._sum_sq, self._nonfinite = tables["sum"], tables["sum_sq"], tables["nonfinite"]
        self._empty = tables["empty"]

    def attach(self) -> "FisherProxy":
        """Start gathering: hooks on the targeted layers (and the model, for token masks) read
        every following backward pass. Returns the proxy; ``with proxy:`` attaches and detaches."""
        if not self._handles:
            # LocalHook: a copy of the model taken while attached (an EMA, a teacher, torch.save)
            # neither feeds these statistics nor fails to pickle
            self._handles = [handle for t in self.targets for handle in (
                self._call_params.register(t.module, self._forward_hook(t.name)))]
            if self._example_weights is not None:
                self._handles.append(self._model.register_forward_pre_hook(LocalHook(self._example_weights.observe),
                                                                           with_kwargs=True))
        return self

    def detach(self) -> None:
        """Stop gathering (remove the hooks); what was gathered stays for :meth:`estimates`.
        Calls whose kept graph is gone are folded in now: no forward of a measured layer would
        fold them any more, and each holds a layer input and its dY."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._call_params.clear()
        self._fold_pending(released_only=True)  # no pass can reach them: the same sums as later
        if self._example_weights is not None:  # the last batch's mask would outlive the pass
            self._example_weights.clear()

    def __enter__(self) -> "FisherProxy":
        return self.attach()

    def __repr__(self) -> str:
        get = self.__dict__.get  # with defaults: a debugger shows proxies whose constructor failed half-way
        return (f"FisherProxy({len(get('targets') or ())} layers, reduction={get('reduction')!r}, "
                f"sketch_dim={get('sketch_dim')!r}, attached={bool(get('_handles'))})")

    def __exit__(self, *exc) -> None:
        self.detach()

    def _forward_hook(self, name: str):
        def hook(module, args, kwargs, output):
            trainable = self._call_params.current(module)
            if self._pending and not torch.compiler.is_compiling():
                self._fold_pending(released_only=True)  # bounds what retained graphs leave behind
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            x = layer_input(args, kwargs).detach()
            # c_n^2 of this call's batch, bound now: the backward may run after the next forward
            weights = None if self._example_weights is None else self._example_weights.squared(name, x)
            nodes = accumulator_nodes(module, output, trainable)
            recomputed = self._recomputation(name) if torch._C._current_graph_task_id() != -1 else None
            if recomputed is None:
                call = _Call(name, x, weights)

                def on_grad(grad):
                    self._backward_pass(nodes, call, grad)

                call.hook = weakref.ref(on_grad)  # it lives as long as a pass can reach the call
            else:
                node, key, keep = recomputed

                def on_grad(grad):
                    self._backward_pass(nodes, self._recomputed_call(node, key, x, weights), grad, keep)

            output.register_hook(on_grad)

        return hook

    def _recomputation(self, name: str):
        """A forward run by a backward: reentrant activation checkpointing recomputes its segment
        in every pass through it, and backpropagates the copy in a pass of its own. The copies
        of one call in several passes are one call (the same node runs them, in the same order):
        ``(node, key, keep)``, keep whether the outer pass keeps the graph; None outside a node."""
        node = torch._C._current_autograd_node()
        try:  # the call is released with the node (a Python Function's, as checkpoint's, can be)
            weakref.ref(node)
        except TypeError:  # None, or a node that cannot say when it is gone: a call of its own
            return None
        task = torch._C._current_graph_task_id()
        if task != self._recompute_task:  # the order of calls restarts in every pass
            self._recompute_task, self._recompute_order = task, {}
        index = self._recompute_order.get((id(node), name), 0)
        self._recompute_order[(id(node), name)] = index + 1
        return node, (id(node), name, index), torch._C._autograd._get_current_graph_task_keep_graph()

    def _recomputed_call(self, node, key, x: torch.Tensor, weights) -> "_Call":
        """The call ``key`` of a recomputing node, shared by the passes through it (made when
        its first dY arrives: a copy that never gets one, as non-reentrant checkpointing's, is
        not held)."""
        call = self._recomputed.get(key)
        if call is None:
            call = self._recomputed[key] = _Call(key[1], x, weights)
            call.key = key
            # no pass reaches the call once the node is gone
            weakref.finalize(node, self._release_recomputed, key, call)
        return call

    def _release_recomputed(self, key, call: "_Call") -> None:
        call.released = True
        if self._recomputed.get(key) is call:
            del self._recomputed[key]

    def _backward_pass(self, nodes, call: "_Call", grad_y: torch.Tensor, keep: bool | None = None) -> None:
        """One backward pass's dY of ``call``. Passes through one call sum, as ``.grad`` sums
        them, and the call's examples count once: it is folded in when a pass frees the graph;
        one whose graph is kept waits until no pass can reach it any more (folded at the next
        forward of a measured layer) or :meth:`estimates`. Passes that leave
        ``.grad`` alone (``torch.autograd.grad``) are not the step's gradient and are skipped.
        ``keep``: whether the pass keeps the graph, for a recomputed call (its own pass never
        does; the outer one says); None: the running pass says."""
        if not pass_feeds_grad(nodes):
            return
        grad_y = grad_y.detach()
        if call.grad is None:
            call.grad, call.scale = grad_y, self._loss_scale()
        else:
            call.grad = call.grad + grad_y
        if keep is None:
            keep = torch._C._autograd._get_current_graph_task_keep_graph()
        if keep:  # another pass may come through the call
            if id(call) not in self._pending:
                if call.scale is not None:  # the scaler updates its scale in place before a later fold
                    call.scale = call.scale.clone()
                if call.hook is not None:
                    # the hook dies with the last graph that reaches the call: no pass can add to it then
                    weakref.finalize(call.hook(), setattr, call, "released", True)
            self._pending[id(call)] = call
        else:
            self._pending.pop(id(call), None)
            self._fold(call)

    def _fold(self, call: "_Call") -> None:
        grad, call.grad = call.grad, None  # a pass after the fold starts a new gradient
        if call.key is not None and self._recomputed.get(call.key) is call:
            del self._recomputed[call.key]
        self._accumulate(call.name, call.x, grad, call.weights, call.scale)

    def _fold_pending(self, released_only: bool = False) -> None:
        """Fold in the calls whose graph was kept (only those no pass can reach any more)."""
        for key, call in list(self._pending.items()):
            if call.released or not released_only:
                del self._pending[key]
                self._fold(call)

    @torch.no_grad()
    def _accumulate(self, name: str, x: torch.Tensor, grad_y: torch.Tensor,
                    weights: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
        if x.dim() == 1:  # an input without a batch dim is one example, as nn.Linear reads it
            x, grad_y = x.unsqueeze(0), grad_y.unsqueeze(0)
        # a backward() called under autocast would run these products in its dtype
        with autocast_off(x.device.type):
            if self.sketch_dim is None:
                sq = _exact_sq_grad_norms(x, grad_y.detach())  # (B,)
            else:
                sq = sketched_sq_grad_norms(x, grad_y.detach(), self.sketch_dim, self._generator(x.device))
        if self.reduction == "mean":
            sq = sq * float(sq.shape[0]) ** 2
        sq = sq.double()
        if weights is not None:
            sq = sq * weights.to(sq.device)
        if scale is not None:  # dY carries this step's loss scale S: ||g_n||^2 carries S^2
            sq = sq / scale.to(device=sq.device, dtype=torch.float64).square()
        if self.loss_multiplier != 1.0:  # likewise the loop's constant factor
            sq = sq / self.loss_multiplier ** 2
        # a NaN/inf loss gives non-finite dY: keep those examples out of the sums and count
        # them on the device (no host sync per step); estimates() reports them
        finite = torch.isfinite(sq)
        sq = torch.where(finite, sq, torch.zeros((), dtype=sq.dtype, device=sq.device))
        bad = (~finite).sum().double()
        self._nonfinite[name] = self._nonfinite[name] + bad if name in self._nonfinite else bad
        if weights is not None:  # c_n = 0: a padding row without real tokens is no example of the mean
            empty = ((weights.to(sq.device) == 0) & finite).sum().double()
            self._empty[name] = self._empty[name] + empty if name in self._empty else empty
        if name in self._sum:
            self._sum[name] += sq.sum()
            self._sum_sq[name] += sq.square().sum()
        else:
            self._sum[name], self._sum_sq[name] = sq.sum(), sq.square().sum()
        self._count[name] += sq.shape[0]

    def _loss_scale(self) -> torch.Tensor | None:
        """The scaler's current loss scale as a device tensor (no host sync), None when unscaled."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        # the public get_scale() reads it to the host; the backward of a scaled loss runs after
        # scale(), which creates this tensor
        return scaler._get_scale_async()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:  # seeded once: the same probes on every rank
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def estimates(self) -> dict[str, Estimate]:
        """Tr(F_i) as the mean of ||g_n||^2 over all examples seen, with its standard error.

        A layer that no backward pass reached (the loss does not use it) is left out with a
        warning; RuntimeError if that is every layer. Examples whose gradient was not finite
        (a NaN/inf loss) are left out with a warning; RuntimeError if that is all of a layer's.
        With ``reduction="token_mean"`` an example without real tokens (a row of padding) is no
        example: it is neither in the mean nor in ``num_probes``.
        All layers' statistics go through one collective and one host copy; under
        torch.distributed the processes must have the same targets, reduction, sketch_dim and
        seed (ValueError on every process otherwise).
        """
        self._fold_pending()
        out = {}
        # every target's statistics, zeros where this process saw none: under torch.distributed
        # each process reduces the same rows, so a layer reached on one process only (routed
        # experts, a process without batches) is neither dropped nor summed into another's row
        seen = [t.name for t in self.targets if self._count[t.name] > 0 and t.name in self._sum]
        device = self._sum[seen[0]].device if seen else self.targets[0].weight.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        stats = torch.stack([torch.stack([self._sum.get(n, zero).to(device), self._sum_sq.get(n, zero).to(device),
                                          torch.tensor(float(self._count[n]), dtype=torch.float64, device=device),
                                          self._nonfinite.get(n, zero).to(device=device, dtype=torch.float64),
                                          self._empty.get(n, zero).to(device=device, dtype=torch.float64)])
                             for n in (t.name for t in self.targets)])          # (layers, 5)
        # processes must count the same layers the same way: the settings' fingerprint rides along
        failure = SharedFailure("FisherProxy.estimates", settings={
            "targets": [t.name for t in self.targets], "reduction": self.reduction,
            "sketch_dim": self.sketch_dim, "seed": self._seed})
        flat = failure.sum_and_check(stats.reshape(-1))
        all_rows = [flat[i:i + 5] for i in range(0, len(flat), 5)]
        names = [t.name for t, row in zip(self.targets, all_rows) if row[2] > 0]
        reached = set(names)
        unreached = [t.name for t in self.targets if t.name not in reached]
        if unreached and not names:
            raise RuntimeError(f"FisherProxy saw no backward pass through layer {unreached[0]!r} "
                               f"yet, nor through any other of its layers {unreached[:5]}: it records only "
                               "the forward and backward passes run inside `with proxy:` (or between "
                               "proxy.attach() and proxy.detach()) that accumulate into .grad "
                               "(loss.backward(); torch.autograd.grad passes are left out)")
        if unreached:
            warn_user(f"FisherProxy: no gradient reached layer(s) {unreached} (the loss does not use them, or "
                      "neither they nor any layer before them has a parameter that requires grad, as when "
                      "the first layers' adapters are frozen: their outputs carry no gradient); they are left "
                      "out of the estimates", RuntimeWarning)
        rows = [row for row in all_rows if row[2] > 0]
        for name, (total, total_sq, n_seen, bad, empty) in zip(names, rows):
            n = n_seen - bad - empty
            if n == 0 and bad:
                raise RuntimeError(f"FisherProxy: every one of the {int(n_seen - empty)} examples through "
                                   f"layer {name!r} had a non-finite gradient (NaN/inf): check the loss")
            if n == 0:
                raise RuntimeError(f"FisherProxy: the token mask gave none of the {int(n_seen)} examples through "
                                   f"layer {name!r} a real token (reduction='token_mean')")
            if bad:
                warn_user(f"FisherProxy left out {int(bad)} of {int(n_seen)} examples of layer "
                          f"{name!r} whose gradient was not finite (a NaN/inf loss, or an fp16 "
                          "overflow step that a GradScaler skips)",
                          RuntimeWarning)
            mean = total / n
            var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
            stderr = math.sqrt(var / n) if n > 1 else math.inf
            out[name] = Estimate(mean, stderr, int(n))
        return out

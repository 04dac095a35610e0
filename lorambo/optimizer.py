"""LoRAMBoOptimizer: the seed API that measures, allocates, sizes pools and grows ranks online.

It is an allocator, not a torch optimizer: it decides ranks and edits the LoRA pools in place;
a torch optimizer keeps training the parameters. ``opt.make_optimizer(lr)`` gives the default one,
:class:`lorambo.optim.AdamW` (per-slot Adam step counts); any other must be passed to ``step`` so
the state of changed slots moves with them.

    opt = LoRAMBoOptimizer(model, total_budget=1_000_000, sensitivity_method="gradient")
    ranks = opt.compute_optimal_ranks(batches, loss_fn)      # reports pool memory first
    opt.configure()                # = configure_model(model, ranks, capacity=opt.capacities)
    torch_opt = opt.make_optimizer(lr=1e-3)                  # lorambo.optim.AdamW
    for step, batch in enumerate(loader):
        with opt.capture(step, batch):                    # hooks only on decision steps
            loss_fn(model, batch).backward()
        opt.step(step)                                    # grows ranks in place when due
        torch_opt.step(); torch_opt.zero_grad()

Capacities (room to grow). ``capacity=None`` sizes each pool as
``clip(next_pow2(growth_factor * r_i), 8, min(d_i, k_i, max_rank, budget // (d_i + k_i)))``:
growth_factor times the allocated rank (default 2, rounded up to a power of two: the layer's own
rule, :func:`lorambo.nn.default_capacity`), never more than the whole budget could ever buy in
that layer (``lorambo.allocation.capacity``). An int or a dict sets them directly. Their device
memory is logged (logger ``lorambo``), printed with ``verbose=True`` and kept in
``opt.memory_report`` before any pool is created.

This class is the public face over the pieces that do the work: ``lorambo.sensitivity``
(measuring), ``lorambo.allocate`` (ranks), ``allocation.capacity`` (pool sizes),
``allocation.schedule`` + ``allocation.online`` (growth during training),
``allocation.alora`` (ALoRA rounds), and ``allocation.decision_steps``, the training-loop
methods it inherits (``capture``, ``step``, ``update_ranks``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lorambo.allocation import METHODS, allocate
from lorambo.allocation import capacity as pools
from lorambo.allocation import resume
from lorambo.allocation.alora import ALoRA, ALoRAConfig
from lorambo.allocation.decision_steps import DecisionSteps
from lorambo.allocation.api import SENSITIVITY_READERS, check_curves_read
from lorambo.allocation.frozen import frozen_ranks, without
from lorambo.allocation.online import check_growth_settings
from lorambo.allocation.report import DecisionLog, rank_table, save_heatmap
from lorambo.allocation.schedule import DecisionSchedule, ScheduledGrowth
from lorambo.allocation.validate import check_budget_buys_minimum, check_rank_bounds
from lorambo.distributed import SharedFailure, decision_generator, is_main_process
from lorambo.model import configure_model, find_targets, lora_layers
from lorambo.model.argument import require_module
from lorambo.model.modules_to_save import check_not_targets, resolve_modules_to_save
from lorambo.model.targeting import refuse_peft_modules
from lorambo.model.unwrap import unwrap_model
from lorambo.nn import LoRAMBoLinear
from lorambo.nn.base_layers import base_kind, features, weight_out_in
from lorambo.nn.finite_numbers import is_finite_number, shown_number
from lorambo.nn.lora_linear import check_growth_factor
from lorambo.nn.optimizer_argument import OptimizerArgument
from lorambo.optim import AdamW
from lorambo.sensitivity.inputs import Batches, LossFn
from lorambo.sensitivity.token_mask import TokenMask, check_token_mask
from lorambo.user_warnings import warn_user

__all__ = ["LoRAMBoOptimizer", "SENSITIVITY_METHODS", "ALLOCATIONS"]

logger = logging.getLogger("lorambo")

SENSITIVITY_METHODS = ("hessian", "gradient", "data", "frobenius", "ablation")
ALLOCATIONS = METHODS + ("alora",)


class _OwnerMethod:
    """``getattr(owner, name)()``, holding ``owner`` weakly. The allocator's growth schedule calls
    back into the allocator it belongs to; a bound method there would be a reference cycle, so a
    deleted allocator, its model and their device memory would stay until Python's cyclic
    garbage collector happens to run (device memory pressure never triggers it)."""

    def __init__(self, owner, name: str):
        self._owner, self._name = weakref.ref(owner), name

    def __call__(self):
        owner = self._owner()
        if owner is None:
            raise RuntimeError(f"the LoRAMBoOptimizer whose {self._name} this schedule calls was deleted")
        return getattr(owner, self._name)()

    def __deepcopy__(self, memo):  # a copied allocator's schedule calls the copy, as a bound method would
        return _OwnerMethod(copy.deepcopy(self._owner(), memo), self._name)

    def __reduce__(self):
        return _OwnerMethod, (self._owner(), self._name)


def _unreached_everywhere(names: list[str], unreached: list[str], batches: list,
                          failure: SharedFailure) -> list[str]:
    """The ``names`` in ``unreached`` on every process. Each process checks its own batches;
    with routed layers (experts) they differ, and every process must keep the same targets, or
    the sensitivity collectives would add up different layers. The batch count and ``failure``
    (that check's) ride along in the same collective."""
    from lorambo.sensitivity.inputs import check_some_batches

    *reached, count = failure.sum_and_check(torch.tensor(
        [float(n not in unreached) for n in names] + [float(len(batches))], dtype=torch.float64))
    check_some_batches(count, "LoRAMBoOptimizer.compute_sensitivities")
    return [n for n, hits in zip(names, reached) if hits == 0]


class LoRAMBoOptimizer(DecisionSteps):
    """Per-layer rank allocation under ``total_budget`` = max of ``sum_i r_i (d_i + k_i)``.

    Args:
        model: a plain model (targets: ``target_modules``, peft semantics) or one with
            LoRAMBoLinear layers (targets: those layers, whose capacities are then fixed). Under
            torch.compile / DDP wrappers, layers are named as in the plain model (no
            ``_orig_mod.`` / ``module.``) and measured on it; :meth:`configure` returns ``model``.
        total_budget: the most LoRA parameters ``sum_i r_i (d_i + k_i)``, online growth included.
        target_modules: as in :func:`lorambo.configure_model`; None: the model's LoRAMBoLinear
            layers if it has any, else peft's all-linear (without poolers).
        sensitivity_method: "hessian" (Tr H_i, Hutchinson), "gradient" (mean ||dL/dW_i||^2),
            "data" (Tr(W G W^T) = E||W x||^2 with G = E[x x^T]), "frobenius" (||W_i||_F^2) or
            "ablation" (summed positive AB-LoRA scores of trained adapters; needs LoRA layers).
            Only :meth:`compute_sensitivities` reads it: allocations "uniform", "knapsack" and
            "alora" never call it, and "frobenius_greedy" / "data_weighted" not for "frobenius"
            or "data" (their curves already hold W, and G); no warning says so.
        allocation: a ``lorambo.allocate`` method, or "alora" (uniform start, then ALoRA rounds).
            "frobenius_greedy" uses sigma(W_i); "data_weighted" the data-weighted tails of W_i.
        capacity, growth_factor: pool sizes, see the module docstring.
        min_rank, max_rank: bounds for every layer.
        warmup_steps, interval, stop_step: online decisions at steps ``warmup_steps + j*interval``
            (``interval=None``: never), before ``stop_step`` (None: no end).
        loss_improvement_threshold: a rank is added only if its marginal benefit exceeds it.
        sketch_rank, power_iters, max_tokens: online estimate settings (``allocation/online.py``).
        move_threshold, max_moves: rank moves (see ``OnlineGrowth``); scores come from
            ``update_ranks(component_scores=...)`` or, if ``heldout_batches`` and ``loss_fn`` are
            given, from the held-out loss each component's removal costs on them (ablation
            without ALoRA's "alone" part). Moves go one way per layer over the run
            (docs/allocation.md, *Rank moves go one way*).
        alpha: LoRA alpha of the layers :meth:`configure` builds (default: each layer's rank).
        num_probes: Hutchinson probes for ``sensitivity_method="hessian"``.
        seed: seeds the probes and the initialisation of grown slots (the same on every process).
        alora: an :class:`ALoRAConfig` (or dict) for ``allocation="alora"``.
        log_path: JSON-lines file receiving every online decision (main process only); the
            run's first decision replaces what an earlier run left there, and
            :meth:`load_state_dict` rewrites it with the saved decisions.
        verbose: also print the pool memory report.
        initial_budget: what ``compute_optimal_ranks`` may spend (default ``total_budget``); the
            rest of ``total_budget`` is left for online growth.
        token_mask: which tokens of a padded batch are real (``"auto"``: a dict batch's
            ``attention_mask``; a callable ``batch -> [B, T]`` mask; None: every position; see
            :mod:`lorambo.sensitivity.token_mask`), for ``sensitivity_method="data"``,
            ``allocation="data_weighted"`` and online growth: ``capture(step, batch)`` keeps
            pads out of the growth statistics and of the scale of new A rows.
            ``LoRAMBoCallback`` passes each Trainer batch.
        modules_to_save: whole modules (a classification head, e.g. ``["classifier"]``) that
            :meth:`configure` keeps trainable and ``save_adapter`` stores, as
            ``configure_model(..., modules_to_save=...)`` (peft semantics: names or name
            suffixes). Checked now: an entry that matches no module, or one that is or holds a
            LoRA target, is a ValueError naming it.
    """

    def __init__(self, model: torch.nn.Module, total_budget: float, sensitivity_method: str = "hessian",
                 target_modules: str | Iterable[str] | None = None,
                 capacity: int | Mapping[str, int] | None = None, growth_factor: float = 2.0, min_rank: int = 0,
                 max_rank: int | None = None,
                 allocation: str = "closed_form", alpha: float | None = None, num_probes: int = 32,
                 seed: int = 0, warmup_steps: int = 0, interval: int | None = None,
                 stop_step: int | None = None, loss_improvement_threshold: float = 0.0,
                 sketch_rank: int = 4, power_iters: int = 4, move_threshold: float | None = None,
                 max_moves: int = 1, heldout_batches: Batches | None = None, loss_fn: LossFn | None = None,
                 alora: ALoRAConfig | Mapping[str, Any] | None = None, log_path: str | os.PathLike[str] | None = None,
                 verbose: bool = False, initial_budget: float | None = None, max_tokens: int | None = None,
                 token_mask: TokenMask = "auto", modules_to_save: str | Iterable[str] | None = None) -> None:
        require_module(model, "LoRAMBoOptimizer")
        if sensitivity_method not in SENSITIVITY_METHODS:
            raise ValueError(f"sensitivity_method={sensitivity_method!r}; choose one of {SENSITIVITY_METHODS}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={allocation!r}; choose one of {ALLOCATIONS}")
        if alora is not None and allocation != "alora":  # it would configure nothing
            raise ValueError(f"LoRAMBoOptimizer: alora={alora!r} is given with allocation={allocation!r}; "
                             "ALoRA rounds run only with allocation='alora'")
        check_rank_bounds(min_rank, max_rank)
        # used only by configure(), after a measurement that may take minutes: check it now
        if alpha is not None and (not is_finite_number(alpha) or alpha == 0):
            raise ValueError(f"LoRAMBoOptimizer: alpha={shown_number(alpha)} must be a finite nonzero number, or None "
                             "(each layer's rank)")
        check_growth_factor(growth_factor, "LoRAMBoOptimizer")
        # the online settings are used at the first decision step, maybe hours in: check them now
        check_growth_settings(loss_improvement_threshold, sketch_rank, power_iters,
                              move_threshold=move_threshold, max_moves=max_moves, max_tokens=max_tokens)
        check_token_mask(token_mask, "LoRAMBoOptimizer")
        self.token_mask = token_mask
        self.schedule = DecisionSchedule(warmup_steps, interval, stop_step)
        self.model, self.sensitivity_method, self.allocation = model, sensitivity_method, allocation
        # layers are named, found and measured in the model under its torch.compile / DDP
        # wrappers, so names (ranks, decisions, state_dict) are the plain model's and a state
        # saved with the wrapper loads without it, and the other way round
        self.plain_model = unwrap_model(model)
        self.min_rank, self.max_rank, self.growth_factor = int(min_rank), max_rank, float(growth_factor)
        self.alpha, self.num_probes, self.seed, self.verbose = alpha, num_probes, int(seed), verbose
        self.threshold = float(loss_improvement_threshold)
        self.sketch_rank, self.power_iters, self.max_tokens = sketch_rank, power_iters, max_tokens
        self.move_threshold, self.max_moves = move_threshold, max_moves
        self.heldout_batches, self.loss_fn = heldout_batches, loss_fn
        self.alora_config = alora if isinstance(alora, ALoRAConfig) else ALoRAConfig(**(alora or {}))
        self.log = DecisionLog(log_path, enabled=is_main_process())
        self.names, self.dims, self.dtypes = self._find_targets(target_modules)
        self.modules_to_save = self._check_modules_to_save(modules_to_save)
        self.costs = {n: d + k for n, (d, k) in self.dims.items()}
        self.total_budget = self._check_budget(total_budget, "total_budget")
        self.initial_budget = self.total_budget if initial_budget is None else \
            self._check_budget(initial_budget, "initial_budget")
        if self.initial_budget > self.total_budget:
            raise ValueError(f"initial_budget={initial_budget!r} exceeds total_budget={total_budget!r}")
        existing = {n: m.capacity for n, m in lora_layers(self.plain_model).items()}
        self.user_capacity = pools.fixed_capacities(existing, capacity, self.dims, self.min_rank)
        self.sensitivities: dict[str, float] | None = None
        self.ranks: dict[str, int] | None = None
        self.capacities: dict[str, int] | None = None
        self.memory_report: dict | None = None
        self.scheduled_growth = ScheduledGrowth(self.schedule, _OwnerMethod(self, "_build_growth"),
                                                _OwnerMethod(self, "_heldout_scores"))
        self._alora: ALoRA | None = None
        self.default_optimizer: torch.optim.Optimizer | None = None  # see make_optimizer
        # the last step whose decision changed ranks: a second call for it takes none (see step)
        self._decided_step: int | None = None
        self._warned_decided_again = False

    # ------------------------------------------------------------------------ validation
    def _find_targets(self, target_modules):
        refuse_peft_modules(self.plain_model, "LoRAMBoOptimizer: ")  # find_targets would, without the name
        existing = lora_layers(self.plain_model)
        names = (list(existing) if target_modules is None and existing
                 else find_targets(self.plain_model, target_modules))
        dims, dtypes = {}, {}
        for n in names:
            m = self.plain_model.get_submodule(n)
            if isinstance(m, LoRAMBoLinear):
                dims[n], dtypes[n] = (m.out_features, m.in_features), m.lora_A.dtype
            else:
                k, d = features(m, base_kind(m))
                dims[n], dtypes[n] = (d, k), m.weight.dtype
        return names, dims, dtypes

    def _check_modules_to_save(self, entries) -> list[str]:
        """The dotted names ``entries`` select, checked as :meth:`configure` would check them
        after a measurement that may take minutes (see ``lorambo.model.modules_to_save``)."""
        try:
            names = resolve_modules_to_save(self.plain_model, entries)
            check_not_targets(names, self.names)
        except (TypeError, ValueError) as e:
            raise type(e)(f"LoRAMBoOptimizer: {e}") from None
        return names

    def _check_budget(self, budget, what: str) -> int:
        if not is_finite_number(budget):
            raise ValueError(f"{what}={shown_number(budget)} must be a finite number of parameters")
        check_budget_buys_minimum(what, budget, budget, self.costs, self.min_rank)
        return int(budget)

    # ---------------------------------------------------------------------- sensitivities
    def compute_sensitivities(self, batches: Batches | None = None, loss_fn: LossFn | None = None,
                              progress: bool | None = None) -> dict[str, float]:
        """``{name: s_i >= 0}`` by ``sensitivity_method`` on ``batches`` (see the class doc;
        "frobenius" reads the weights only and needs no batches). ``progress``: the bar of the
        estimator that runs ("hessian": ``hessian_trace``, "gradient": ``gradient_sensitivity``,
        "data": ``data_covariance``, "ablation": ``ablation_scores``; None: on when stderr is a
        terminal; False inside a loop that draws its own).

        With "hessian" and "gradient", targets that get no gradient from the loss on any batch
        (e.g. BERT's pooler under a loss on the hidden states) are dropped from ``names`` with a
        RuntimeWarning: no budget is spent on them. The batches after the first are checked only
        for the targets the batches before did not reach (a head of one task, a routed expert)."""
        from lorambo.sensitivity.inputs import as_batch_list
        from lorambo.sensitivity.progress import check_progress
        from lorambo.sensitivity.simple import unreached_by_any

        check_progress(progress, "LoRAMBoOptimizer.compute_sensitivities")
        method = self.sensitivity_method
        if method in ("hessian", "gradient"):
            batches = as_batch_list(batches, "LoRAMBoOptimizer.compute_sensitivities")
            failure = SharedFailure("LoRAMBoOptimizer.compute_sensitivities",
                                    settings={"targets": self.names, "method": method})
            unreached = list(self.names)  # a process without batches reaches none of them
            with failure:
                if batches:
                    unreached = unreached_by_any(self.plain_model, loss_fn, batches, self.names,
                                                  "LoRAMBoOptimizer.compute_sensitivities")
            self._skip_unreached(_unreached_everywhere(self.names, unreached, batches, failure))
        names = self.names
        # process 0's scores on every process: the last bits of an SVD, einsum or sum can differ
        # between machines, and a rank decided from them must not (docs/architecture.md)
        failure = SharedFailure("LoRAMBoOptimizer.compute_sensitivities", settings={"targets": names, "method": method})
        local = torch.zeros(len(names), dtype=torch.float64)
        with failure:
            measured = self._measure(method, names, batches, loss_fn, progress)
            local = torch.tensor([float(measured[n]) for n in names], dtype=torch.float64)
        values = dict(zip(names, failure.broadcast_and_check(local)))
        for n, v in values.items():
            if not math.isfinite(v):
                raise ValueError(f"{method} sensitivity of layer {n!r} is {v!r} (not finite): check the "
                                 "loss on these batches")
        self.sensitivities = {n: max(float(values[n]), 0.0) for n in names}
        return dict(self.sensitivities)

    def _measure(self, method: str, names: list[str], batches, loss_fn, progress) -> dict[str, float]:
        """This process's ``{name: score}`` by ``method`` (see :meth:`compute_sensitivities`)."""
        from lorambo import sensitivity as sens

        if method == "hessian":
            est = sens.hessian_trace(self.plain_model, loss_fn, batches, modules=names,
                                     num_probes=self.num_probes, seed=self.seed, progress=progress)
            values = {n: e.value for n, e in est.items()}
            negative = {n: v for n, v in values.items() if v < 0}
            if negative:  # curvature of a non-convex loss, or probe noise: no rank is owed
                warn_user(f"negative Hessian trace estimates set to 0: {negative}", RuntimeWarning)
        elif method == "gradient":
            values = sens.gradient_sensitivity(self.plain_model, loss_fn, batches, modules=names,
                                               progress=progress)
        elif method == "data":
            cov = sens.data_covariance(self.plain_model, loss_fn, batches, modules=names,
                                       token_mask=self.token_mask, progress=progress)
            values = {}
            for n in names:  # Tr(W G W^T) = E ||W x||^2
                w = self._weight(n)
                values[n] = float(torch.einsum("oi,ij,oj->", w, cov[n].to(w), w))
        elif method == "frobenius":
            values = {n: float(self._weight(n).pow(2).sum()) for n in names}
        else:
            from lorambo.sensitivity.ablation import ablation_scores

            scores = ablation_scores(self.plain_model, loss_fn, batches, modules=names, progress=progress)
            values = {n: float(a.score.clamp_min(0).sum()) for n, a in scores.items()}
            untrained = [n for n in names if not self.plain_model.get_submodule(n).delta_weight().any()]
            if untrained == names:  # every score is 0 then, and the allocation 0/0
                raise ValueError(f"sensitivity_method='ablation': the adapters of {names[:4]} are untrained (B A = "
                                 "0), so removing a component changes no loss and every score is 0; train them "
                                 "first, or measure with another sensitivity_method ('hessian', 'gradient', ...)")
        return values

    def _skip_unreached(self, unreached: list[str]) -> None:
        """Leave out targets the loss never reaches: they would take budget and learn nothing."""
        if not unreached:
            return
        if len(unreached) == len(self.names):
            raise ValueError(f"the loss depends on none of the target layers {unreached[:5]}, or they run "
                             "under reentrant activation checkpointing (torch.utils.checkpoint with "
                             "use_reentrant=True), whose weights torch.autograd.grad cannot reach; use "
                             "use_reentrant=False or turn checkpointing off while measuring")
        warn_user(f"no gradient reaches layer(s) {unreached} (the loss does not use them): they "
                  "are skipped, no rank is allocated to them", RuntimeWarning)
        self.names = [n for n in self.names if n not in unreached]
        for table in (self.dims, self.costs, self.dtypes, self.user_capacity):
            for n in unreached:
                table.pop(n, None)

    def _weight(self, name) -> torch.Tensor:
        m = self.plain_model.get_submodule(name)
        w = m.weight if isinstance(m, LoRAMBoLinear) else weight_out_in(m, base_kind(m))
        return w.detach().double()

    # ------------------------------------------------------------------------ allocation
    def compute_optimal_ranks(self, batches: Batches | None = None, loss_fn: LossFn | None = None,
                              sensitivities: Mapping[str, float] | None = None, progress: bool | None = None,
                              **allocate_kwargs: Any) -> dict[str, int]:
        """``{name: rank}`` within ``initial_budget``; also sets ``capacities`` and ``memory_report``.

        ``sensitivities`` given: used as is (validated: known layers, all present, finite, >= 0);
        an allocation that does not read them ("uniform", "alora", "knapsack") refuses them, as
        every allocation refuses a curve it does not read (``benefits`` is the knapsack's): the
        caller meant another allocation.
        ``progress``: the bars of the passes over ``batches`` it runs (the sensitivity pass, see
        :meth:`compute_sensitivities`, and ``data_covariance`` for "data_weighted").
        Extra keyword arguments go to :func:`lorambo.allocate` (e.g. ``benefits`` for knapsack).
        """
        from lorambo.sensitivity.progress import check_progress

        check_progress(progress, "LoRAMBoOptimizer.compute_optimal_ranks")
        method = "uniform" if self.allocation == "alora" else self.allocation
        self._check_inputs_read(method, sensitivities, allocate_kwargs)
        if method == "knapsack" and allocate_kwargs.get("benefits") is None:
            # nothing measures the knapsack's gain curves: the caller brings them
            raise ValueError("LoRAMBoOptimizer(allocation='knapsack') needs the gain curves: pass "
                             "compute_optimal_ranks(..., benefits={layer name: gains g[r] of rank r -> r + 1}) "
                             f"for each of its {len(self.names)} layers (e.g. {self.names[0]!r})")
        if (sensitivities is None and method in ("frobenius_greedy", "data_weighted")
                and self.sensitivity_method in ("frobenius", "data")):
            # the curves already carry W (and G): nothing to measure, and ``sensitivities`` (e.g.
            # ranks.json's) must be what the allocation used, not the unused ||W||^2 / E||W x||^2
            sensitivities = self.sensitivities = dict.fromkeys(self.names, 1.0)
        elif sensitivities is None and method not in ("uniform", "knapsack"):
            if (batches is None or loss_fn is None) and self.sensitivity_method != "frobenius":
                raise ValueError(f"allocation={self.allocation!r} with sensitivity_method="
                                 f"{self.sensitivity_method!r} needs batches and loss_fn")
            sensitivities = self.compute_sensitivities(batches, loss_fn, progress)
        caps = self._fixed_capacities()
        uppers = {n: min(self.dims[n]) for n in self.names}
        if method == "frobenius_greedy" and "spectra" not in allocate_kwargs:
            allocate_kwargs["spectra"] = {n: torch.linalg.svdvals(self._weight(n)).cpu().numpy()
                                          for n in self.names}
        if method == "data_weighted" and "tail_energies" not in allocate_kwargs:
            allocate_kwargs["tail_energies"] = self._tails(batches, loss_fn, caps, uppers, progress)
        # process 0's ranks on every process: spectra, tails and the allocation's float sums may
        # differ in their last bits between machines, and the pools built from the ranks must not
        failure = SharedFailure("LoRAMBoOptimizer.compute_optimal_ranks", settings={
            "targets": self.names, "method": method, "budget": self.initial_budget, "min_rank": self.min_rank,
            "max_rank": self.max_rank, "capacities": caps})
        local = torch.zeros(len(self.names), dtype=torch.float64)
        with failure:
            ranks = self._allocate(method, sensitivities, caps, allocate_kwargs)
            local = torch.tensor([float(ranks[n]) for n in self.names], dtype=torch.float64)
        self.ranks = {n: int(r) for n, r in zip(self.names, failure.broadcast_and_check(local))}
        self.capacities = self.plan_capacities(self.ranks)
        self.memory_report = self.pool_memory(self.capacities)
        return dict(self.ranks)

    def _check_inputs_read(self, method: str, sensitivities, allocate_kwargs: Mapping[str, Any]) -> None:
        """ValueError for an input that ``allocation`` would ignore, before anything is measured."""
        where = f"LoRAMBoOptimizer(allocation={self.allocation!r}).compute_optimal_ranks"
        if sensitivities is not None and method not in SENSITIVITY_READERS:
            raise ValueError(f"{where}: sensitivities= is given, but allocation={self.allocation!r} does "
                             f"not read sensitivities (those that do: {', '.join(SENSITIVITY_READERS)}): "
                             "leave it out or construct the optimizer with one of those")
        check_curves_read(where, self.allocation, allocate_kwargs, setting="allocation")

    def _allocate(self, method, sensitivities, caps, allocate_kwargs) -> dict[str, int]:
        """``allocate`` over the targets, leaving existing adapters whose ``lora_B`` is frozen at
        their rank (they cannot train new slots, lorambo/allocation/frozen.py); the others share
        the budget they leave."""
        frozen = frozen_ranks(lora_layers(self.plain_model), self.names)
        held = sum(r * self.costs[n] for n, r in frozen.items())
        budget = self.initial_budget - held
        need = sum(self.min_rank * self.costs[n] for n in self.names if n not in frozen)
        if budget < need:  # allocate's own error would name the budget left, which nobody passed
            others = f", and min_rank={self.min_rank} in the other layers takes {need}: {held + need} in all" \
                if need else ""
            raise ValueError(f"LoRAMBoOptimizer.compute_optimal_ranks: the layers whose lora_B is frozen "
                             f"{list(frozen)[:4]} keep their ranks, which take {held} parameters{others}, "
                             f"more than initial_budget={self.initial_budget}")
        if len(frozen) == len(self.names):
            return frozen
        per_layer = {k: without(v, frozen) if isinstance(v, Mapping) else v for k, v in allocate_kwargs.items()}
        ranks = allocate(without(self.dims, frozen), without(sensitivities, frozen), budget, method=method,
                         min_rank=self.min_rank, max_rank=self.max_rank, capacities=without(caps, frozen) or None,
                         **per_layer)
        return {**ranks, **frozen}

    def _tails(self, batches, loss_fn, caps, uppers, progress):
        from lorambo.sensitivity import data_covariance, data_weighted_tail_energy

        if batches is None or loss_fn is None:
            raise ValueError("allocation='data_weighted' needs batches and loss_fn (input covariances)")
        cov = data_covariance(self.plain_model, loss_fn, batches, modules=self.names, token_mask=self.token_mask,
                              progress=progress)
        return {n: data_weighted_tail_energy(self._weight(n), cov[n],
                                             min(caps.get(n, uppers[n]), uppers[n])).cpu().numpy()
                for n in self.names}

    def plan_capacities(self, ranks: Mapping[str, int]) -> dict[str, int]:
        """Pool size per layer (fixed for existing LoRA layers; see the module docstring)."""
        return pools.plan_capacities(ranks, self.dims, self._fixed_capacities(), self.growth_factor,
                                     self.max_rank, self.total_budget)

    def _fixed_capacities(self) -> dict[str, int]:
        """The capacities planning keeps: the user's, and those of targets that are LoRAMBoLinear
        now (also the ones :meth:`configure` built after construction: their pools cannot resize)."""
        built = {n: m.capacity for n, m in lora_layers(self.plain_model).items() if n in self.dims}
        return {**self.user_capacity, **built}

    def pool_memory(self, capacities: Mapping[str, int]) -> dict[str, Any]:
        """Bytes of every pool (``capacity * (d + k)`` elements), logged and returned."""
        report = pools.pool_memory(capacities, self.dims, self.dtypes, self.ranks)
        msg = pools.describe_pool_memory(report, self.total_budget)
        logger.info(msg)
        if self.verbose and is_main_process():
            print(msg)
        return report

    def configure(self, ranks: Mapping[str, int] | None = None, dropout: float | None = None,
                  optimizer: OptimizerArgument | None = None) -> torch.nn.Module:
        """``configure_model(model, ranks, capacity=self.capacities, alpha=..., modules_to_save=...)``;
        returns the model.
        With ``allocation="alora"`` and no ``heldout_batches`` or ``loss_fn``, a ValueError before
        anything changes: the rounds could not score components.
        ``optimizer`` (default: the one from :meth:`make_optimizer`) has the state of existing
        adapters whose rank changes edited with them."""
        ranks = dict(ranks or self.ranks or {})
        if not ranks:
            raise RuntimeError("configure(): call compute_optimal_ranks first or pass ranks")
        if self.allocation == "alora":  # its rounds, maybe hours into training, need them
            missing = [k for k, v in (("heldout_batches", self.heldout_batches), ("loss_fn", self.loss_fn))
                       if v is None]
            if missing:
                raise ValueError(f"LoRAMBoOptimizer.configure: allocation='alora' scores components by ablation "
                                 f"on heldout_batches with loss_fn in its rounds; {' and '.join(missing)} not "
                                 "given to the constructor")
        caps = self.capacities or self.plan_capacities(ranks)
        caps = {n: c for n, c in caps.items() if n in ranks}  # ranks may name fewer layers than were planned
        optimizer = optimizer if optimizer is not None else self.default_optimizer
        # existing adapters that grow get rows seeded by ``seed``, like every other growth: the same
        # on every process, the global generator untouched (docs/architecture.md)
        configure_model(self.plain_model, ranks, capacity=caps, alpha=self.alpha, dropout=dropout,
                        optimizer=optimizer, generator=decision_generator(self.seed, "configure"),
                        modules_to_save=self.modules_to_save or None)
        return self.model

    # --------------------------------------------------------------------- torch optimizer
    def make_optimizer(self, lr: float = 1e-3, **adamw_kwargs: Any) -> AdamW:
        """A :class:`lorambo.optim.AdamW` over the model's trainable parameters (per-slot Adam
        step counts, so slots grown later train as under a fresh Adam). It becomes the optimizer
        whose state :meth:`step` / :meth:`update_ranks` edit when they are given none."""
        if not lora_layers(self.plain_model):  # configure() would then freeze all it holds and add pools it lacks
            raise RuntimeError(f"make_optimizer: {type(self.model).__name__} has no LoRAMBoLinear layers yet, so "
                               "the optimizer would hold the whole model's weights, which configure() then "
                               "freezes, and none of the adapters; call configure() (after "
                               "compute_optimal_ranks) first")
        self.default_optimizer = AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr,
                                       **adamw_kwargs)
        return self.default_optimizer

    # ---------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """What resuming needs besides the model's own ``state_dict``: the decisions so far, the
        ALoRA rounds done, the allocation (ranks, capacities, sensitivities), the settings and
        layers it was made for, and the state of the optimizer from :meth:`make_optimizer`.
        Plain data and tensors: ``torch.load(..., weights_only=True)`` reads it. Call it between
        steps (after :meth:`step`), not while a decision step's activations are captured."""
        return resume.allocator_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: restores :attr:`decisions`, rewrites the decision
        log with them (dropping records an interrupted run wrote after the save), loads the
        optimizer from :meth:`make_optimizer` (call that first) and drops activations captured
        before it. The model must already hold the saved ranks (load its ``state_dict`` first).
        A state written for other layers, shapes, settings or ranks is a ValueError naming what
        differs, and nothing is changed."""
        resume.check_allocator_state(self, state)
        resume.apply_allocator_state(self, state)
        self.close()  # activations captured before the resume belong to none of its decisions
        self._decided_step = None  # a step retried after the resume decides again, on the loaded ranks

    # ------------------------------------------------------------------------ visibility
    def current_ranks(self) -> dict[str, int]:
        """``{name: rank}`` of the allocator's layers now."""
        return {n: m.rank for n, m in self.layers().items()}

    def rank_table(self) -> str:
        """A text table of the model's LoRA layers: rank, capacity and LoRA parameters of each, and totals."""
        return rank_table(self.plain_model)

    def save_heatmap(self, path: str | os.PathLike[str], title: str = "LoRA rank per layer") -> Path:
        """Write the current ranks as a PNG heat map (rows: blocks, columns: module types; needs
        matplotlib) and return its path."""
        return save_heatmap(self.current_ranks(), path, title)

    @property
    def decisions(self) -> list[dict[str, Any]]:
        """The online decisions so far, oldest first: the records of the decision log
        (:func:`lorambo.read_decisions` reads them from ``log_path``)."""
        return list(self.log.records)

    def __repr__(self) -> str:
        # stored settings only, each looked up with a default: a debugger or a traceback shows
        # allocators whose constructor failed half-way, and reading the layers could raise
        get = self.__dict__.get
        ranks, log, schedule = get("ranks"), get("log"), get("schedule")
        shown = [f"{len(get('names') or ())} layers", f"total_budget={get('total_budget')!r}",
                 f"initial_budget={get('initial_budget')!r}", f"sensitivity_method={get('sensitivity_method')!r}",
                 f"allocation={get('allocation')!r}", f"interval={getattr(schedule, 'interval', None)!r}",
                 "not allocated" if ranks is None else f"allocated ranks={sum(ranks.values())}",
                 f"decisions={len(getattr(log, 'records', ()))}"]
        return f"LoRAMBoOptimizer({', '.join(shown)})"

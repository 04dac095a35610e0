"""The training-loop half of :class:`lorambo.LoRAMBoOptimizer`: capture, decide, grow, move.

:class:`DecisionSteps` is the part of the allocator that runs inside the user's training loop:
which steps decide (``warmup_steps``, ``interval``, ``stop_step``, or ALoRA's rounds), arming the
activation hooks on those steps (:meth:`DecisionSteps.capture`), taking the decision
(:meth:`DecisionSteps.step`, :meth:`DecisionSteps.update_ranks`), and following the model's
layers when they are replaced. It holds no settings of its own: the allocator's constructor sets
what it reads (``plain_model``, ``names``, ``allocation``, ``schedule``, ``scheduled_growth``,
``alora_config``, the growth settings, ``heldout_batches``, ``loss_fn``, ``default_optimizer``,
``token_mask``, ``_alora``, ``_decided_step``, ``_warned_decided_again``).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
# from its module: torch 2.11's torch.amp has no __all__, so mypy --strict does not see
# torch.amp.GradScaler as exported there (torch 2.13's does)
from torch.amp.grad_scaler import GradScaler

from lorambo.allocation.alora import ALoRA
from lorambo.allocation.online import OnlineGrowth, check_grad_scaler
from lorambo.model import lora_layers
from lorambo.nn import LoRAMBoLinear
from lorambo.nn.optimizer_argument import OptimizerArgument, optimizer_argument, skips_this_step, wrapper_grad_scaler
from lorambo.ops.compile_support import run_eagerly
from lorambo.sensitivity.token_mask import batch_token_mask
from lorambo.user_warnings import warn_user

__all__ = ["DecisionSteps"]

_Allocator = TypeVar("_Allocator", bound="DecisionSteps")  # capture() yields the allocator, typed as the caller's


class DecisionSteps:
    """Mixin of :class:`lorambo.LoRAMBoOptimizer`: its methods for the training loop."""

    def layers(self) -> dict[str, LoRAMBoLinear]:
        """``{name: LoRAMBoLinear}`` of the allocator's layers as the model holds them now; a
        RuntimeError while they are not LoRA layers yet (before :meth:`configure`)."""
        found = lora_layers(self.plain_model)
        missing = [n for n in self.names if n not in found]
        if missing:
            raise RuntimeError(f"layers {missing[:4]} are not LoRAMBoLinear yet: configure the model first")
        return {n: found[n] for n in self.names}

    @property
    def online(self) -> OnlineGrowth:
        """The online growth that decides at the decision steps, following the model's layers."""
        self._follow_layers()
        return self.scheduled_growth.growth

    def _follow_layers(self) -> None:
        """Point online growth and ALoRA at the model's LoRAMBoLinear layers as they are now.
        Both keep the layers they were built with, so after ``unload`` and a new ``configure``
        (new layer objects) they would capture and grow layers no longer in the model, skip every
        decision with a warning to use ``capture()``, and keep the old pools in memory."""
        layers = self.layers()
        growth = self.scheduled_growth.built
        if growth is not None and any(growth.layers.get(n) is not m for n, m in layers.items()):
            self.scheduled_growth.rebuild()
        if self._alora is not None and any(self._alora.layers.get(n) is not m for n, m in layers.items()):
            self._alora.layers = layers

    def _build_growth(self) -> OnlineGrowth:
        return OnlineGrowth(self.layers(), self.total_budget, self.threshold, self.sketch_rank,
                            self.power_iters, seed=self.seed, move_threshold=self.move_threshold,
                            max_moves=self.max_moves, log=self.log, max_tokens=self.max_tokens,
                            min_rank=self.min_rank, max_rank=self.max_rank)

    def _heldout_scores(self) -> dict:
        """Component scores for rank moves: the held-out loss each component's removal costs
        (AB-LoRA's ``removed``, on ``heldout_batches``). A move removes a component while the
        others stay, so ALoRA's ``alone`` part is not what it costs; on the MiniLM planted task
        the full AB-LoRA score made moves worse than none (docs/demo.md)."""
        missing = [name for name, value in (("heldout_batches", self.heldout_batches), ("loss_fn", self.loss_fn))
                   if value is None]
        if missing:
            raise ValueError(f"LoRAMBoOptimizer: move_threshold={self.move_threshold!r} makes rank moves, which need "
                             "scores of the active components: pass component_scores=... to step / update_ranks "
                             "(LoRAMBoCallback(importance=...) does), or build the allocator with heldout_batches "
                             f"and loss_fn to score them by ablation (missing: {' and '.join(missing)})")
        from lorambo.sensitivity.ablation import ablation_scores

        # a pass inside the user's training step, under the user's own bar: none of its own
        return {n: a.removed for n, a in ablation_scores(self.plain_model, self.loss_fn, self.heldout_batches,
                                                         self.names, alone=False, progress=False).items()}

    # the decision schedule's settings (fixed at construction)
    warmup_steps = property(lambda self: self.schedule.warmup_steps, doc="Steps before the first online decision.")
    interval = property(lambda self: self.schedule.interval, doc="Steps between online decisions (None: none).")
    stop_step = property(lambda self: self.schedule.stop_step,
                         doc="No online decision at this step or later (None: no end).")

    @staticmethod
    def _check_step(step, who: str) -> None:
        """The loop's step counter, checked here: a batch passed in its place (``capture(batch)``)
        or None would fail deep in the schedule, and a negative step would silently never be a
        decision step."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"LoRAMBoOptimizer.{who}: step must be the training step, an int >= 0, got "
                            f"{type(step).__name__} {step!r:.60} (the call is {who}(step, ...))")
        if step < 0:
            raise ValueError(f"LoRAMBoOptimizer.{who}: step must be an int >= 0, got {step}")

    def is_decision_step(self, step: int) -> bool:
        """Whether :meth:`step` decides at ``step`` (the schedule; ALoRA's rounds with allocation="alora")."""
        self._check_step(step, "is_decision_step")
        if self.allocation == "alora":
            return step in self.alora_config.decision_steps()
        return self.schedule.is_decision_step(step)

    def begin_step(self, step: int, batch: Any = None) -> None:
        """Arm the activation hooks if ``step`` is an online decision step (else nothing).
        ``batch``: the batch the following forward runs on; its token mask (``token_mask``)
        keeps pads out of the capture. A later call with the next micro-batch replaces it.
        Calls with the same ``step`` are micro-batches of one step and accumulate, so a failed
        attempt stays captured and the hooks armed: retry after :meth:`close`, or use
        :meth:`capture`, which drops a failed attempt itself."""
        self._check_step(step, "begin_step")
        # a step whose decision changed ranks captures nothing more: no later call of step() uses it
        if self.allocation != "alora" and self.is_decision_step(step) and not self.decided_already(step):
            mask = None if batch is None else batch_token_mask(self.token_mask, batch, "LoRAMBoOptimizer")
            self._follow_layers()
            self.scheduled_growth.begin_step(step, mask)

    @contextmanager
    def capture(self: _Allocator, step: int, batch: Any = None) -> Iterator[_Allocator]:
        """Wrap the forward and backward of ``step``: records X and dY only on online decision
        steps (ALoRA captures nothing). Pass the ``batch`` so that pads are not captured (see
        ``token_mask``); without it every position is. A block that raises (out of memory, say)
        leaves nothing captured for the step: its backward stopped partway, and a decision from
        it would grow only the layers it reached."""
        self._check_step(step, "capture")
        self.begin_step(step, batch)
        try:
            yield self
        except BaseException:
            self.scheduled_growth.close()
            raise
        finally:
            self.scheduled_growth.disarm()

    # Decisions run eagerly inside a compiled training step (a graph break): traced, their host-side
    # bookkeeping (seeded generators, layer lists, rank edits) would recompile at every decision step.
    @run_eagerly
    def step(self, step: int, optimizer: OptimizerArgument | None = None,
             component_scores: Mapping[str, torch.Tensor] | None = None,
             grad_scaler: GradScaler | None = None) -> list[dict[str, Any]]:
        """Take the decision of ``step`` if one is due; returns its records (possibly []).
        ``optimizer`` defaults to the one from :meth:`make_optimizer`. Training with a
        ``torch.amp.GradScaler``: pass it as ``grad_scaler`` (before ``scaler.update()``), so
        gains are measured on the unscaled loss and ``loss_improvement_threshold`` means the same
        as without AMP. An ``optimizer`` that wraps one (accelerate's ``AcceleratedOptimizer``, what
        ``accelerator.prepare`` returns) brings its scaler when ``grad_scaler`` is None; inside
        ``accelerator.accumulate`` it also defers the decision, as its own ``step()`` does, to the
        micro-batch that ends the accumulation, so the decision sees every micro-batch of the step.

        A step changes ranks once: after a decision that changed ranks, a later call with the
        same ``step`` (a plain loop that calls it after every micro-batch) takes none and warns
        once, as a second decision would spend the step's budget again on the micro-batches that
        followed the first.

        ``component_scores`` (one score per active slot of each layer) rank the slots that rank
        moves take away, so they need ``move_threshold``; given without it, or with
        ``allocation="alora"`` (which scores by held-out ablation), they are a ValueError rather
        than dropped without a word."""
        self._check_step(step, "step")
        # checked at every call: otherwise a wrong one (an LR scheduler) passes every step until the
        # first decision step, which may come after hours of training
        optimizer_argument(optimizer, "LoRAMBoOptimizer.step")
        check_grad_scaler(grad_scaler, "LoRAMBoOptimizer.step")
        self._check_scores_are_read(component_scores, "step")
        if skips_this_step(optimizer):
            return []  # the capture keeps this micro-batch; the next calls with this step add to it
        grad_scaler = grad_scaler if grad_scaler is not None else wrapper_grad_scaler(optimizer)
        optimizer = optimizer if optimizer is not None else self.default_optimizer
        decides = self.is_decision_step(step)
        if decides and self.decided_already(step):
            self._warn_decided_again(step)
            return []
        if decides:
            self._follow_layers()
        if self.allocation == "alora":
            records = self.alora_schedule().step(step, optimizer)
        else:
            records = self.scheduled_growth.step(step, optimizer, component_scores, grad_scaler)
        if records:
            # not after a refusal (it raised) nor a decision that changed nothing (nothing passed the
            # threshold, an overflowed step skipped): a loop that repeats the step number decides again
            self._decided_step = step
        return records

    def _check_scores_are_read(self, component_scores, who: str) -> None:
        """Only rank moves read ``component_scores``: a caller who passes them expects moves."""
        if component_scores is None:
            return
        if self.allocation == "alora":
            raise ValueError(f"LoRAMBoOptimizer.{who}: component_scores were given, but allocation='alora' "
                             "scores its layers by held-out ablation and would never read them; drop them")
        if self.move_threshold is None:
            raise ValueError(f"LoRAMBoOptimizer.{who}: component_scores were given, but move_threshold is None, "
                             "so no rank moves are made and the scores would never be read; pass "
                             "LoRAMBoOptimizer(..., move_threshold=...) for rank moves, or drop component_scores")

    def decided_already(self, step: int) -> bool:
        """Whether a decision at ``step`` has changed ranks already, so that :meth:`step` takes
        none at that step again (until :meth:`restart_steps` or :meth:`load_state_dict`)."""
        return step == self._decided_step

    def _warn_decided_again(self, step: int) -> None:
        if not self._warned_decided_again:
            self._warned_decided_again = True
            warn_user(f"LoRAMBoOptimizer.step({step}): step {step} has changed ranks already, so this call "
                      "takes no decision (nor will later repeated calls, without another warning). Under "
                      "gradient accumulation call step(step) once per optimizer step, after the last "
                      "micro-batch's backward, so that its decision sees every micro-batch", RuntimeWarning)

    def alora_schedule(self) -> ALoRA:
        """The ALoRA rounds of ``allocation="alora"``, built on first use (the layers must exist)."""
        if self._alora is None:
            self._alora = ALoRA(self.plain_model, self.layers(), self.loss_fn, self.heldout_batches,
                                self.alora_config, self.total_budget, self.seed, self.log,
                                self.min_rank, self.max_rank)
        return self._alora

    @run_eagerly  # eagerly, as step()
    def update_ranks(self, optimizer: OptimizerArgument | None = None, step: int | None = None,
                     component_scores: Mapping[str, torch.Tensor] | None = None,
                     grad_scaler: GradScaler | None = None) -> list[dict[str, Any]]:
        """Grow (and, with ``move_threshold``, move) ranks now from the captured step
        (``grad_scaler``, and the scaler of a wrapped ``optimizer``, and ``component_scores``:
        see :meth:`step`). With ``allocation="alora"``, which grows nothing online, a RuntimeError."""
        if self.allocation == "alora":  # its capture takes nothing: the error would blame the capture
            raise RuntimeError("LoRAMBoOptimizer.update_ranks grows ranks by online growth, but allocation='alora' "
                               "changes ranks in ALoRA rounds only: call step(step) at every step instead")
        optimizer_argument(optimizer, "LoRAMBoOptimizer.update_ranks")  # before the state it needs
        check_grad_scaler(grad_scaler, "LoRAMBoOptimizer.update_ranks")
        self._check_scores_are_read(component_scores, "update_ranks")
        grad_scaler = grad_scaler if grad_scaler is not None else wrapper_grad_scaler(optimizer)
        optimizer = optimizer if optimizer is not None else self.default_optimizer
        self._follow_layers()
        return self.scheduled_growth.update(step, optimizer, component_scores, grad_scaler)

    def close(self) -> None:
        """Remove the activation hooks and drop what they captured (also done after every
        decision): call it when an attempt at a step begun with :meth:`begin_step` fails."""
        self.scheduled_growth.close()

    def restart_steps(self) -> None:
        """A training loop whose step numbers start again (a new ``trainer.train()``, or
        accelerate's retry with a smaller batch under ``auto_find_batch_size``): forget which step
        last changed ranks, so that the new loop's decision at that step number is taken rather
        than refused as a repeat (see :meth:`step`). Also drops what was captured (:meth:`close`)."""
        self.close()
        self._decided_step = None

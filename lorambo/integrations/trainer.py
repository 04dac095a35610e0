"""``LoRAMBoCallback``: online rank decisions inside transformers' ``Trainer``.

Where in the step (transformers 5.x ``Trainer._inner_training_loop``):

- ``on_step_begin`` runs before the first micro-batch of an optimizer step: the activation hooks
  are armed there on decision steps, so every micro-batch of the step is recorded;
- ``on_pre_optimizer_step`` runs after backward (and gradient clipping) and *before*
  ``optimizer.step()``: gradients still exist (``model.zero_grad()`` follows ``optimizer.step()``,
  so by ``on_step_end`` they are gone). The decision is taken here, with the optimizer, so the
  state of every re-activated slot is reset before the step uses it. New slots have zero
  gradient in this step, so the coming ``optimizer.step()`` leaves them as initialised.

Trainer hands callbacks accelerate's ``AcceleratedOptimizer``; its wrapped torch optimizer
(``.optimizer``) owns the state that is reset. ``state.global_step`` counts finished optimizer
steps, so the step being taken is ``global_step`` in both events.

Padding: Trainer calls the model as ``model(**batch)``. On decision steps a forward pre-hook on
the allocator's model hands each micro-batch's keyword arguments to ``allocator.begin_step``, so
the allocator's ``token_mask`` (its ``attention_mask`` by default) keeps pads out of the capture.

Each decision is appended to the allocator's decision log (``log_path``) and to
``callback.decisions``. Pass ``Trainer(..., optimizers=(allocator.make_optimizer(lr), None))``
so the optimizer is :class:`lorambo.optim.AdamW` (per-slot Adam steps); with Trainer's default
torch AdamW the callback warns once at the start of training. (Adding keys to the Trainer's logs from ``on_log`` would not work: the
Trainer stores a copy of the logs before callbacks see them.)

Checkpoints: ``on_save`` adds ``adapter.safetensors`` (the adapter, modules_to_save included)
and ``lorambo_state.pt`` (decisions, importance EMAs, ALoRA rounds; see
:mod:`lorambo.integrations.checkpoint`) to every checkpoint folder. When Trainer resumes
(``trainer.train(resume_from_checkpoint=...)``) it reloads the pools, ranks and optimizer state
itself; ``on_train_begin`` then restores the rest from ``<output_dir>/checkpoint-<step>`` (or
``resume_from``), so the run continues as if it had never stopped. Pools and modules_to_save
that Trainer's loading missed (an architecture transformers saves under other keys than it
loads) are restored from the checkpoint's ``adapter.safetensors``, with a warning
(:mod:`lorambo.integrations.pool_resume`). With
``load_best_model_at_end`` Trainer ends by loading the best checkpoint's model, at the ranks it
had then; ``on_train_end`` restores that checkpoint's decisions (and importance) alike.
Trainer deletes the checkpoints beyond ``save_total_limit`` before ``on_save`` runs, so with
``save_total_limit=1`` a run killed in between has no complete checkpoint left: keep it >= 2
(docs/interop.md, "Trainer checkpoints and resume").

Retries: under ``auto_find_batch_size`` accelerate reruns the inner loop after an out-of-memory
error, from step 0 on the ranks and weights the failed attempt left; ``on_train_begin`` restarts
the allocator's step count (:meth:`~lorambo.LoRAMBoOptimizer.restart_steps`), so the retry
decides at every decision step. A decision the error stopped part-way keeps the rank changes it
made, and the callback follows them (``decisions``, the importance averages) before re-raising.

FSDP2: when the pools are sharded (``fully_shard``), decisions go through
:func:`lorambo.integrations.fsdp.allocator_step` and the adapter through its ``save_adapter``
(every process gathers, the processes that write Trainer's checkpoint write it), with the
same limits as there.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch.amp.grad_scaler import GradScaler
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorambo.adapters.io import save_adapter
from lorambo.integrations import checkpoint, fsdp
from lorambo.integrations.pool_resume import restore_missed_adapter
from lorambo.model import lora_layers
from lorambo.nn.local_hooks import LocalHook
from lorambo.nn.optimizer_argument import inner_optimizer, scaler_keyed_optimizer, wrapper_grad_scaler
from lorambo.sharding import is_sharded
from lorambo.user_warnings import warn_user

if TYPE_CHECKING:
    from lorambo.optimizer import LoRAMBoOptimizer
    from lorambo.sensitivity import AdaLoRAImportance

__all__ = ["LoRAMBoCallback"]


def _unscale_gradients(grad_scaler, optimizer) -> None:
    """Have an enabled ``grad_scaler`` unscale the gradients now unless that was done this step
    (Trainer's gradient clipping does it; with ``max_grad_norm=0`` nothing does before the
    optimizer step), so importance scores see the gradients of the unscaled loss, not ones
    scaled by a factor that changes during training. ``scaler.step`` then does not unscale again
    (torch's documented unscale-then-clip pattern). The stage is read from the scaler's
    per-optimizer record, the one place it is kept; ``unscale_`` refuses a second call."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    if grad_scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        grad_scaler.unscale_(optimizer)


def _has_sharded_pools(model) -> bool:
    """FSDP2 (``fully_shard``) made the pools DTensors: rank edits and saving must gather them."""
    return any(is_sharded(layer.lora_A) for layer in lora_layers(model).values())


def _warn_if_not_slot_aware(optimizer) -> None:
    """Trainer builds its own optimizer before any callback runs, so the callback cannot choose
    it; it can say once that slots grown later will take oversized Adam steps."""
    from lorambo.optim import AdamW

    if isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, AdamW):
        warn_user(f"LoRAMBoCallback: Trainer's optimizer is {type(optimizer).__name__}, which keeps one "
                  "Adam step count per parameter, so slots grown during training take oversized first "
                  "steps. Pass Trainer(..., optimizers=(allocator.make_optimizer(lr=...), None)) to use "
                  "lorambo.optim.AdamW.")


class LoRAMBoCallback(TrainerCallback):
    """Drive a :class:`lorambo.LoRAMBoOptimizer` (online growth or ALoRA) from a Trainer.

    Args:
        allocator: the ``LoRAMBoOptimizer`` whose model is the Trainer's model (configured).
        importance: optional ``AdaLoRAImportance`` updated every step from the gradients, whose
            component scores feed rank moves (``move_threshold``) when given.
        resume_from: checkpoint folder to restore lorambo's state from when Trainer resumes
            (default: ``<output_dir>/checkpoint-<global_step>``, where Trainer writes them).
        grad_scaler: the GradScaler of an fp16 run, so growth gains are measured on the unscaled
            loss (see ``LoRAMBoOptimizer.step``). None: the one Trainer's accelerator made, read
            from the ``AcceleratedOptimizer`` handed to ``on_pre_optimizer_step`` (its
            ``scaler``; None under bf16/fp32, where the loss is not scaled). With ``importance``
            the callback unscales the gradients before scoring them unless Trainer's clipping
            already did. DeepSpeed's fp16
            scales the loss with its own scaler, which is not a GradScaler and is not found:
            there the gains carry its loss scale (use bf16 with DeepSpeed).

    An argument of the wrong kind (not a ``LoRAMBoOptimizer``, ``AdaLoRAImportance``, folder
    path or ``GradScaler``) is a ``TypeError`` naming it, raised here rather than at the first
    step or resume.
    """

    def __init__(self, allocator: LoRAMBoOptimizer, importance: AdaLoRAImportance | None = None,
                 resume_from: str | os.PathLike[str] | None = None,
                 grad_scaler: GradScaler | None = None) -> None:
        from lorambo.allocation.online import check_grad_scaler
        from lorambo.optimizer import LoRAMBoOptimizer
        from lorambo.sensitivity import AdaLoRAImportance

        # the model or the torch optimizer in its place would fail only at the first step or save
        if not isinstance(allocator, LoRAMBoOptimizer):
            raise TypeError(f"LoRAMBoCallback: allocator must be a lorambo.LoRAMBoOptimizer (built on the "
                            f"Trainer's model), got {type(allocator).__name__}")
        if importance is not None and not isinstance(importance, AdaLoRAImportance):
            raise TypeError(f"LoRAMBoCallback: importance must be a lorambo.sensitivity.AdaLoRAImportance or "
                            f"None, got {type(importance).__name__}")
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError(f"LoRAMBoCallback: resume_from must be a checkpoint folder (a str or path) or None, "
                            f"got {type(resume_from).__name__} {resume_from!r:.60}")
        check_grad_scaler(grad_scaler, "LoRAMBoCallback")
        self.allocator = allocator
        self.importance = importance
        self.resume_from = resume_from
        self.grad_scaler = grad_scaler
        self.decisions: list[dict] = []
        self._batch_hook = None

    def __repr__(self) -> str:
        get = self.__dict__.get  # with defaults: a debugger shows callbacks whose constructor failed half-way
        return (f"LoRAMBoCallback(allocator={get('allocator')!r}, importance={get('importance')!r}, "
                f"decisions={len(get('decisions') or ())})")

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # a run stopped by an error (or Ctrl-C) inside a decision step never reached
        # on_pre_optimizer_step or on_train_end: its hooks would keep capturing, and what they
        # captured would go into this run's first decision
        self._remove_batch_hook()
        # Trainer's step numbers start again (at 0, or at a resumed checkpoint's): under
        # auto_find_batch_size accelerate reruns the loop after an out-of-memory error, and the
        # retry's first decision would be refused as a repeat of the failed attempt's last one
        self.allocator.restart_steps()
        _warn_if_not_slot_aware(inner_optimizer(optimizer))
        if state.global_step == 0:
            return
        folder = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        try:
            saved = checkpoint.load_callback_state(folder)
        except FileNotFoundError as err:
            if self.resume_from is None and os.path.isdir(folder):
                # Trainer's files are there, lorambo's are not: the run stopped while saving this
                # checkpoint (LoRAMBoCallback.on_save writes after Trainer), so it cannot be resumed
                earlier = checkpoint.complete_checkpoints(args.output_dir, before=state.global_step)
                raise FileNotFoundError(
                    f"Trainer resumed at step {state.global_step}, but {err}: the checkpoint is incomplete (the "
                    "run stopped while saving it, or LoRAMBoCallback did not save it). Resume from "
                    + (f"the last complete one, trainer.train(resume_from_checkpoint={earlier[-1]!r}), or remove "
                       f"{folder}" if earlier else "an earlier complete checkpoint, or remove " + folder)
                    + "; if lorambo's files of this checkpoint are elsewhere, pass "
                    "LoRAMBoCallback(..., resume_from=<that folder>)") from None
            raise FileNotFoundError(f"Trainer resumed at step {state.global_step}, but {err}: pass "
                                    "LoRAMBoCallback(..., resume_from=<checkpoint folder>)") from None
        self._restore_missed_adapter(folder)
        self.decisions = checkpoint.restore(self.allocator, self.importance, saved, folder)

    def _restore_missed_adapter(self, folder: str) -> None:
        """The pools, ranks and modules_to_save Trainer's load of ``folder`` missed, from its
        adapter file (:mod:`lorambo.integrations.pool_resume`)."""
        if _has_sharded_pools(self.allocator.model):
            return
        missed = restore_missed_adapter(self.allocator.model, folder)
        if missed:
            warn_user(f"LoRAMBoCallback: Trainer's checkpoint loading left {len(missed)} adapted layer(s) or "
                      f"modules_to_save without their saved state ({missed[:4]}; transformers saves this "
                      f"architecture under other keys than it loads); restored from {folder}/adapter.safetensors")

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        model = self.allocator.model
        if _has_sharded_pools(model):  # a collective: every process gathers
            fsdp.save_adapter(model, folder, writes=args.should_save)
        elif args.should_save:
            save_adapter(model, folder)
        if args.should_save:  # where Trainer writes the checkpoint: process 0, or each node's first
            checkpoint.save_callback_state(folder, checkpoint.callback_state(self.allocator, self.importance,
                                                                             self.decisions))

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        self.allocator.begin_step(step)
        if self.allocator.is_decision_step(step) and self._batch_hook is None:
            # callbacks never see the batch; the model call does (its kwargs are the batch). A
            # LocalHook: a copy of the model taken meanwhile (an EMA, torch.save) neither fails to
            # pickle nor arms this allocator's capture from its own forward at later steps
            self._batch_hook = self.allocator.model.register_forward_pre_hook(
                LocalHook(lambda module, a, batch: self._begin_step(step, batch)), with_kwargs=True)

    def _begin_step(self, step, batch):
        # a call without grad (a teacher or evaluation pass) captures nothing; it keeps the mask of
        # the last training call, which the layers reentrant checkpointing recomputes in its
        # backward read then
        if torch.is_grad_enabled():
            self.allocator.begin_step(step, batch)

    def _remove_batch_hook(self):
        if self._batch_hook is not None:
            self._batch_hook.remove()
            self._batch_hook = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._remove_batch_hook()
        grad_scaler = self.grad_scaler if self.grad_scaler is not None else wrapper_grad_scaler(optimizer)
        stepped, optimizer = scaler_keyed_optimizer(optimizer), inner_optimizer(optimizer)
        scores = None
        if self.importance is not None:
            if optimizer is not None:
                _unscale_gradients(grad_scaler, stepped)
            folded = self.importance.update()  # every step: the EMAs need the whole history
            if (self.allocator.move_threshold is not None and self.allocator.allocation != "alora"
                    and self.allocator.is_decision_step(state.global_step)):  # ALoRA scores by ablation
                if not folded:  # an overflowed step, which the GradScaler skips: nothing to score moves by
                    warn_user(f"LoRAMBoCallback: step {state.global_step}: the LoRA gradients are not finite "
                              "(NaN/inf): no rank decision is taken at this step", RuntimeWarning)
                    self.allocator.close()
                    return
                scores = self.importance.component_scores()
        logged = len(self.allocator.log.records)
        try:
            if _has_sharded_pools(self.allocator.model):  # gathers the pools on decision steps
                records = fsdp.allocator_step(self.allocator, state.global_step, optimizer, component_scores=scores,
                                              grad_scaler=grad_scaler)
            else:
                records = self.allocator.step(state.global_step, optimizer=optimizer, component_scores=scores,
                                              grad_scaler=grad_scaler)
        except BaseException:
            # a decision stopped part-way (out of memory, which auto_find_batch_size retries) keeps
            # the rank changes it made, on record in the allocator's log: the importance averages
            # and callback.decisions follow them too, or the retry's first update() refuses them
            self._follow(self.allocator.log.records[logged:])
            raise
        self._follow(records)

    def _follow(self, records):
        """Take the rank changes ``records`` into the importance averages and :attr:`decisions`."""
        if self.importance is not None:
            self.importance.follow(records)
        self.decisions.extend(records)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_batch_hook()
        self.allocator.close()
        if getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint is not None:
            self._follow_best_model(state.best_model_checkpoint)

    def _follow_best_model(self, folder: str) -> None:
        """Trainer has just loaded the best checkpoint's model, with the ranks it had then: take
        that checkpoint's decisions (the log cut back to them) and importance averages too, so
        they describe the model Trainer ends with rather than the last step's."""
        try:
            saved = checkpoint.load_callback_state(folder)
        except FileNotFoundError:
            warn_user(f"LoRAMBoCallback: Trainer loaded the best model from {folder}, which has no "
                      f"{checkpoint.STATE_FILE}; callback.decisions and the decision log still describe the "
                      "last step's ranks")
            return
        self._restore_missed_adapter(folder)
        if self.allocator.current_ranks() != saved["ranks"]:  # Trainer warned that it could not load it
            warn_user(f"LoRAMBoCallback: the model's ranks are not those of the best checkpoint {folder} "
                      "(Trainer did not load it); callback.decisions and the decision log describe the "
                      "model as it is")
            return
        self.decisions = checkpoint.restore(self.allocator, self.importance, saved, folder)

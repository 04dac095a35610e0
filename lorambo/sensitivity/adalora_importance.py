"""AdaLoRA's importance of rank components (Zhang et al., 2023), the baseline to AB-LoRA ablation.

Per parameter, the sensitivity ``I = |theta * grad|`` is the first-order loss change when the
parameter is set to zero. One mini-batch gives a noisy I, so AdaLoRA smooths it and weights it
by its own uncertainty (eqs. 9-11 of the paper):

    Ibar_t = beta1 * Ibar_{t-1} + (1 - beta1) * I_t
    Ubar_t = beta2 * Ubar_{t-1} + (1 - beta2) * |I_t - Ibar_t|
    s_t    = Ibar_t * Ubar_t

and scores a component by the mean ``s`` of its parameters. AdaLoRA's triplets also carry a
singular value lambda_k; a LoRAMBo component is the pair (row k of A, column k of B), so

    S_k = mean_j s(A[k, j]) + mean_j s(B[j, k]).

Call :meth:`AdaLoRAImportance.update` after ``backward()`` and before the optimizer zeroes the
gradients (in a Trainer callback: ``on_pre_optimizer_step``); under a ``torch.amp.GradScaler``
after ``scaler.unscale_(optimizer)``, or the scores carry the square of the loss scale (a step
whose gradients overflowed is left out, as the scaler skips it). Under DDP the gradients are already
averaged, so every process holds the same scores. Inactive slots have zero gradient and weight,
hence zero importance. A frozen pool (``requires_grad`` False) is not scored: its layer is scored by
the other pool alone, and statistics it gathered before it was frozen are dropped at the next
:meth:`update` or read, not kept at the values of the step it froze. After a rank change, tell the
tracker with :meth:`keep` (components were compacted by ``keep_components``) or :meth:`reset`
(slots were re-initialised by ``set_rank``, or the layer's pools were loaded or reset), or hand
it the decision records with :meth:`follow`: ``LoRAMBoCallback`` does this for its decisions. Until
then :meth:`update` and :meth:`component_scores` raise, naming the layer: statistics left at the
old slots would score a moved component by another one's history (a decision could drop a
component for the low score of the one it replaced). The tracker tells by the component ids of
the slots (``lorambo/nn/slot_lineage.py``), which every such edit changes.
:meth:`state_dict` keeps the ids of the components its statistics belong to, so statistics
loaded before the model's ``state_dict`` (which brings those components and their ids back)
go on without a call.

Under FSDP2 (pools sharded as DTensors) :meth:`update` all-gathers each pool and its gradient,
so every process keeps the same full, plain statistics (every process must call it): the scores
of a component need its whole row of A and column of B, which lie on different processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lorambo.distributed import SharedFailure
from lorambo.dtensor_gather import prepare_gathers
from lorambo.sharding import is_sharded
from lorambo.model.argument import require_module
from lorambo.nn.finite_numbers import is_finite_number, shown_number
from lorambo.nn.slot_lineage import slot_ids
from lorambo.user_warnings import warn_user

__all__ = ["AdaLoRAImportance"]


def _sample(value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|value * grad|, in at least float32: the product of fp16 values and gradients (1e-3 *
    1e-5) underflows to 0 in fp16, and bf16 rounds it to 3 significant digits."""
    acc = torch.promote_types(value.dtype, torch.float32)
    return (value.to(acc) * grad.to(acc)).abs().float()


class AdaLoRAImportance:
    """EMA-smoothed, uncertainty-weighted |theta * grad| of every LoRA pool entry."""

    def __init__(self, model: torch.nn.Module, modules: Sequence[str] | str | None = None, beta1: float = 0.85,
                 beta2: float = 0.85) -> None:
        from .ablation import lora_targets

        require_module(model, "AdaLoRAImportance")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not (is_finite_number(beta) and 0.0 <= beta < 1.0):
                raise ValueError(f"AdaLoRAImportance: {name} must be a number in [0, 1), got {shown_number(beta)}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.layers = lora_targets(model, modules)
        self._calls = 0  # update() calls that reached the fold, folded in or left out
        self._skipped = 0  # of those, the ones left out for non-finite gradients, read so far
        self._skipped_unread: torch.Tensor | None = None  # and on the device, not read yet
        self._ibar: dict[tuple[str, str], torch.Tensor] = {}
        self._ubar: dict[tuple[str, str], torch.Tensor] = {}
        # the component ids of each layer's slots that the statistics belong to, and after a
        # load_state_dict the ids saved with them, which a later load of the model brings back
        self._followed = {name: slot_ids(layer) for name, layer in self.layers.items()}
        self._saved_ids: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        get = self.__dict__.get  # with defaults: a debugger shows objects whose constructor failed half-way
        return (f"AdaLoRAImportance({len(get('layers') or ())} layers, beta1={get('beta1')!r}, "
                f"beta2={get('beta2')!r}, updates={get('_calls', 0)})")

    @property
    def skipped_steps(self) -> int:
        """:meth:`update` calls left out for non-finite gradients. :meth:`update` counts them on
        the device, without a host read; reading this waits for it."""
        if self._skipped_unread is not None:
            self._skipped += int(self._skipped_unread)
            self._skipped_unread = None
        return self._skipped

    @property
    def steps(self) -> int:
        """:meth:`update` calls folded into the statistics (reading it waits for the device, as
        :attr:`skipped_steps`)."""
        return self._calls - self.skipped_steps

    def _check_followed(self, what: str) -> None:
        """RuntimeError naming the first layer whose slots changed since :meth:`keep` /
        :meth:`reset` (or construction, or :meth:`load_state_dict`) last followed them. A layer
        without statistics yet (no :meth:`update` saw its gradient) follows its slots as they are."""
        for name, layer in self.layers.items():
            ids = slot_ids(layer)
            if ids == self._followed[name]:
                continue
            unfolded = ((name, "A") not in self._ibar and (name, "B") not in self._ibar) or self.steps == 0
            if ids == self._saved_ids.get(name) or unfolded:
                # the components the loaded statistics were saved with, or no statistics yet
                self._followed[name] = ids
                self._saved_ids.pop(name, None)
                continue
            raise RuntimeError(
                f"AdaLoRAImportance.{what}: the slots of layer {name!r} (rank {layer.rank} now) were changed "
                "after its statistics were last matched to them, so they would score components by "
                "other components' history. After each rank change call importance.keep(name, kept) "
                "(keep_components, a rank move: the kept slots in their new order) or "
                "importance.reset(name, slots) (set_rank: the grown or dropped slots; a load_state_dict, "
                "load_adapter or reset_parameters of the layer: range(layer.capacity)) before the next "
                "update() / component_scores(), or load statistics saved with these pools "
                "(importance.load_state_dict); LoRAMBoCallback does this itself")

    @torch.no_grad()
    def update(self) -> torch.Tensor:
        """Fold the current gradients into the running scores (layers without a gradient skip;
        RuntimeError if no layer has one: called before backward() or after zero_grad()). Call it
        once per optimizer step: under gradient accumulation after the last micro-batch's
        backward, since each call counts the gradient accumulated so far as one more step.

        A step whose gradients are not finite (NaN/inf: a ``torch.amp.GradScaler`` step that
        overflowed, which the scaler skips too) is left out whole: it would make the averages
        inf/NaN for good, and every later score with them. Returns whether the step was folded
        in, as a 0-d bool tensor: the test runs on the device, and only reading the answer
        (``if not importance.update():``) waits for it, so a loop that calls this at every step
        keeps the host ahead of the GPU. :attr:`skipped_steps` counts the steps left out."""
        self._check_followed("update")
        self._forget_frozen_pools()
        pools = [((name, which), pool) for name, layer in self.layers.items() for which in ("A", "B")
                 if (pool := getattr(layer, "lora_" + which)).grad is not None and pool.requires_grad]
        if not pools:
            raise RuntimeError(f"AdaLoRAImportance.update(): none of its layers {list(self.layers)[:4]} has a "
                               "gradient: call it after loss.backward() and before optimizer.zero_grad() "
                               "(frozen pools are not scored)")
        samples = {}  # every layer's sample first: a non-finite one leaves all statistics as they were
        # under FSDP2 the statistics are kept whole on every process: the pools and gradients are
        # gathered into tensors allocated first (out of memory there raises on every process
        # before any all-gather), and an error in a product is held back until every process has
        # joined every gather, then raised on all of them, before any statistic changes
        who = "AdaLoRAImportance.update"
        sharded = {key: p for key, p in pools if is_sharded(p)}
        if sharded:
            gathers = prepare_gathers({(key, part): t for key, p in sharded.items()
                                       for part, t in (("value", p.detach()), ("grad", p.grad))}, who)
        failure = SharedFailure(who)
        for key, p in pools:
            if key in sharded:  # each pair's memory goes once its sample is taken
                value, grad = gathers.pop((key, "value")), gathers.pop((key, "grad"))
                samples[key] = failure.run(_sample, value.run(), grad.run())
            else:
                samples[key] = _sample(p.detach(), p.grad)
        if sharded:
            failure.check()
        # no host read: every statistic takes its new value where the whole step is finite and
        # keeps its old one elsewhere (torch.where, which NaN/inf in the other branch do not
        # reach). The gradients (all-reduced under DDP, gathered under FSDP2) are the same on
        # every process, so all of them skip together.
        flags: dict[torch.device, list[torch.Tensor]] = {}
        for inst in samples.values():
            flags.setdefault(inst.device, []).append(torch.isfinite(inst).all())
        first = next(iter(flags))
        folded = torch.stack([torch.stack(per_device).all().to(first) for per_device in flags.values()]).all()
        on = {device: folded.to(device) for device in flags}
        for key, inst in samples.items():
            if key not in self._ibar:  # first sample: Ibar starts at zero, as in AdaLoRA
                self._ibar[key] = torch.zeros_like(inst)
                self._ubar[key] = torch.zeros_like(inst)
            ibar, ubar = self._ibar[key], self._ubar[key]
            new_ibar = ibar.mul(self.beta1).add_(inst, alpha=1 - self.beta1)
            new_ubar = ubar.mul(self.beta2).add_((inst - new_ibar).abs(), alpha=1 - self.beta2)
            ibar.copy_(torch.where(on[inst.device], new_ibar, ibar))
            ubar.copy_(torch.where(on[inst.device], new_ubar, ubar))
        skipped = (~folded).long()
        self._skipped_unread = skipped if self._skipped_unread is None else self._skipped_unread.add_(skipped)
        self._calls += 1
        return folded

    def state_dict(self) -> dict[str, Any]:
        """``{"steps", "skipped_steps", "ibar", "ubar", "slot_ids"}``: the update counts, the
        running statistics as CPU tensors keyed by ``(layer name, "A" | "B")``, and per layer the
        ids of the components they belong to (``torch.load(..., weights_only=True)`` reads it)."""
        return {"steps": self.steps, "skipped_steps": self.skipped_steps,
                "ibar": {k: v.detach().cpu().clone() for k, v in self._ibar.items()},
                "ubar": {k: v.detach().cpu().clone() for k, v in self._ubar.items()},
                "slot_ids": {name: list(ids) for name, ids in self._followed.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`. Statistics for a layer this tracker does not have,
        or of another shape than its pool, are a ValueError naming them; nothing is changed. They
        belong to the layers' components as they are now or, when the model's ``state_dict``
        saved with them is loaded after this, as it brings them back (their saved ids)."""
        if not isinstance(state, dict) or {"steps", "ibar", "ubar"} - set(state):
            raise ValueError("AdaLoRAImportance.load_state_dict: expected a dict with steps, ibar and ubar")
        steps, skipped = state["steps"], state.get("skipped_steps", 0)  # a state saved before it was kept: 0
        for what, count in (("steps", steps), ("skipped_steps", skipped)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"AdaLoRAImportance.load_state_dict: {what}={count!r} must be an int >= 0")
        if set(state["ibar"]) != set(state["ubar"]):
            raise ValueError("AdaLoRAImportance.load_state_dict: ibar and ubar hold different entries")
        for table in ("ibar", "ubar"):
            for key, value in state[table].items():
                name, which = key if isinstance(key, tuple) and len(key) == 2 else (key, None)
                if name not in self.layers or which not in ("A", "B"):
                    raise ValueError(f"AdaLoRAImportance.load_state_dict: {table} entry {key!r} is not a "
                                     f"tracked pool (layers: {list(self.layers)[:6]})")
                pool = getattr(self.layers[name], "lora_" + which)
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(pool.shape):
                    raise ValueError(f"AdaLoRAImportance.load_state_dict: {table}[{key!r}] has shape "
                                     f"{list(getattr(value, 'shape', []))}, the pool has {list(pool.shape)}")
        saved_ids = self._checked_saved_ids(state.get("slot_ids", {}))
        device = {name: self._device(layer.lora_A) for name, layer in self.layers.items()}
        # every copy made first (out of memory moving one to the device changes nothing), then applied whole
        ibar = {k: v.to(device[k[0]], torch.float32) for k, v in state["ibar"].items()}
        ubar = {k: v.to(device[k[0]], torch.float32) for k, v in state["ubar"].items()}
        self._followed = {name: slot_ids(layer) for name, layer in self.layers.items()}
        self._calls, self._skipped, self._skipped_unread = steps + skipped, skipped, None
        self._ibar, self._ubar, self._saved_ids = ibar, ubar, saved_ids

    def _checked_saved_ids(self, saved) -> dict[str, list[int]]:
        """``state["slot_ids"]`` as ``{layer name: ids}``, else a ValueError naming the entry."""
        if not isinstance(saved, dict):
            raise ValueError(f"AdaLoRAImportance.load_state_dict: slot_ids must be a dict of layer name -> ids, "
                             f"got {type(saved).__name__}")
        checked = {}
        for name, ids in saved.items():
            if name not in self.layers:
                raise ValueError(f"AdaLoRAImportance.load_state_dict: slot_ids entry {name!r} is not a tracked layer "
                                 f"(layers: {list(self.layers)[:6]})")
            capacity = self.layers[name].capacity
            if (not isinstance(ids, (list, tuple)) or len(ids) != capacity
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
                raise ValueError(f"AdaLoRAImportance.load_state_dict: slot_ids[{name!r}] must be {capacity} ints "
                                 f"(one per slot), got {ids!r:.80}")
            checked[name] = list(ids)
        return checked

    def _forget_frozen_pools(self) -> None:
        """Drop the statistics of pools frozen since they were gathered: a frozen pool gets no
        gradient, so they would stay at the step it froze and score its layer by that old term
        next to the other pool's current one (a LoRA-FA phase that freezes lora_A mid-run)."""
        for key in [key for key in self._ibar if not getattr(self.layers[key[0]], "lora_" + key[1]).requires_grad]:
            del self._ibar[key], self._ubar[key]

    def parameter_scores(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_A [capacity, in], s_B [out, capacity])`` for layer ``name`` (zeros before updates,
        and for a frozen pool)."""
        self._forget_frozen_pools()
        layer = self.layers[name]
        out = []
        for which in ("A", "B"):
            key = (name, which)
            if key in self._ibar:
                out.append(self._ibar[key] * self._ubar[key])
            else:
                pool = getattr(layer, "lora_" + which)  # its full shape, also when sharded
                out.append(torch.zeros(pool.shape, dtype=torch.float32, device=self._device(pool)))
        return out[0], out[1]

    @staticmethod
    def _device(pool: torch.Tensor) -> torch.device:
        return pool.to_local().device if is_sharded(pool) else pool.device

    def component_scores(self) -> dict[str, torch.Tensor]:
        """``{name: S [rank]}`` with ``S_k = mean s(A[k, :]) + mean s(B[:, k])`` (float64, CPU).
        RuntimeError before the first :meth:`update`: every score would be 0, and a rank move
        would then remove components that nothing was measured for."""
        self._check_followed("component_scores")
        self._forget_frozen_pools()
        if self.steps == 0:
            skipped = (f" ({self.skipped_steps} left out: their gradients were not finite)"
                       if self.skipped_steps else "")
            raise RuntimeError(f"AdaLoRAImportance.component_scores(): no update() yet{skipped}, so there are no "
                               "scores; call importance.update() after every backward")
        self._warn_if_half_scored()
        scores = {}
        for name, layer in self.layers.items():
            s_a, s_b = self.parameter_scores(name)
            r = layer.rank
            scores[name] = (s_a[:r].mean(1) + s_b[:, :r].mean(0)).double().cpu()
        return scores

    def _warn_if_half_scored(self) -> None:
        """Warn (once) if some layers' scores lack the term of a frozen lora_A while other layers'
        scores have it: a frozen pool gets no gradient, so a LoRA-FA layer is scored by lora_B
        alone and ranks below an equally important layer that trains both. Only layers whose
        lora_B trains count: the others take part in no rank move (lorambo/allocation/frozen.py)."""
        if self.__dict__.get("_warned_half"):
            return
        movable = [name for name, layer in self.layers.items() if layer.lora_B.requires_grad]
        half = {}
        if any((name, "A") in self._ibar for name in movable):
            half = {name: "lora_A" for name in movable
                    if (name, "A") not in self._ibar and not self.layers[name].lora_A.requires_grad}
        if half:
            self._warned_half = True
            shown = ", ".join(f"{name} ({pool})" for name, pool in list(half.items())[:4])
            warn_user(f"AdaLoRAImportance.component_scores: layers {shown}{' ...' if len(half) > 4 else ''} hold a "
                      "frozen pool, which gets no gradient, so their scores lack its term while other layers' scores "
                      "have it: they rank below equally important layers in a rank move. Freeze the same pools in "
                      "every layer, or score components by ablation (heldout_batches).", UserWarning)

    def _checked_slots(self, name: str, slots, what: str) -> list[int]:
        """``slots`` as distinct ints in [0, capacity) of layer ``name``, else ValueError/TypeError:
        torch would read -1 as the last slot and 1.5 or True as slot 1, without a word."""
        if name not in self.layers:
            raise ValueError(f"AdaLoRAImportance.{what}: unknown layer {name!r}; tracked layers: "
                             f"{list(self.layers)[:10]}")
        layer = self.layers[name]
        slots = [layer._check_int("slot", k) for k in slots]
        bad = [k for k in slots if not 0 <= k < layer.capacity]
        if bad:
            raise ValueError(f"{layer._label}: AdaLoRAImportance.{what} slots {bad} outside "
                             f"[0, capacity = {layer.capacity})")
        if len(set(slots)) != len(slots):
            raise ValueError(f"{layer._label}: AdaLoRAImportance.{what} slots must be distinct, got {slots}")
        return slots

    def follow(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Take rank changes into the statistics, in order: the records that
        ``LoRAMBoOptimizer.step`` returns (or ``opt.decisions`` adds). A ``shrink`` keeps the slots
        it did not drop, in order (:meth:`keep`); a ``grow`` forgets its new slots (:meth:`reset`).
        A plain loop with rank moves calls ``importance.follow(opt.step(step, component_scores=
        importance.component_scores()))``; ``LoRAMBoCallback`` does this itself. Every record is
        checked before any is applied (a ValueError naming it)."""
        if isinstance(records, Mapping):
            raise TypeError("AdaLoRAImportance.follow takes a list of decision records, got one record: "
                            "wrap it in a list")
        edits = []
        for i, rec in enumerate(records):
            event = rec.get("event") if isinstance(rec, Mapping) else None
            if event not in ("grow", "shrink"):
                raise ValueError(f"AdaLoRAImportance.follow: records[{i}] = {rec!r} is not a rank change "
                                 "(a record with event 'grow' or 'shrink')")
            name, old = rec.get("layer"), rec.get("old_rank")
            if event == "shrink":
                dropped = set(rec.get("components", []))
                edits.append((self.keep, name, [k for k in range(old) if k not in dropped]))
            else:
                edits.append((self.reset, name, list(range(old, rec.get("new_rank")))))
            self._checked_slots(name, edits[-1][2], "follow")
        for edit, name, slots in edits:
            edit(name, slots)

    @torch.no_grad()
    def keep(self, name: str, keep: Sequence[int]) -> None:
        """Mirror ``layer.keep_components(keep)``: move the kept slots' statistics to 0..n-1."""
        keep = self._checked_slots(name, keep, "keep")
        n = len(keep)
        for which, dim in (("A", 0), ("B", 1)):
            for table in (self._ibar, self._ubar):
                t = table.get((name, which))
                if t is None:
                    continue
                idx = torch.as_tensor(keep, dtype=torch.long, device=t.device)
                moved = t.index_select(dim, idx)
                t.narrow(dim, n, t.shape[dim] - n).zero_()
                t.narrow(dim, 0, n).copy_(moved)
        self._followed[name] = slot_ids(self.layers[name])
        self._saved_ids.pop(name, None)

    @torch.no_grad()
    def reset(self, name: str, slots: Sequence[int]) -> None:
        """Forget the statistics of ``slots`` (they were re-initialised by a rank change)."""
        slots = self._checked_slots(name, slots, "reset")
        for which, dim in (("A", 0), ("B", 1)):
            for table in (self._ibar, self._ubar):
                t = table.get((name, which))
                if t is not None and slots:
                    t.index_fill_(dim, torch.as_tensor(slots, dtype=torch.long, device=t.device), 0)
        self._followed[name] = slot_ids(self.layers[name])
        self._saved_ids.pop(name, None)

"""ALoRA's prune-and-reallocate loop (Liu et al., 2024), in place in the LoRAMBoLinear pools.

Start from uniform, budget-compliant ranks. After ``k1`` training steps, and then every ``k2``
steps, ``rounds`` times in all:

1. score every active component with AB-LoRA ablation (``lorambo.sensitivity.ablation``);
2. prune the ``n_prune`` worst (lowest score: useless or harmful) with ``keep_components``
   (all layers in one pass: :func:`lorambo.nn.pool_ops.keep_components_many`);
3. give each freed rank to a module whose components were *not* pruned this round, in order of
   highest mean importance (round robin when more ranks are freed than receivers exist), with
   ``set_rank`` (new slot: B = 0, so the function is unchanged by the growth);
4. the optimizer state of moved slots is reset / compacted with them.

Total rank sum r_i is conserved exactly: a component is only pruned if some receiver can take
its rank within its capacity and within the parameter budget (sum r_i (d_i + k_i) <= budget, which
can move when ranks move between layers of different widths); otherwise it stays.
Modules at rank 0 have no mean importance and receive nothing (as in ALoRA: pruned out).
Rank bounds: the n_prune worst components are those a layer can give without going below
``min_rank``, and a receiver grows at most to ``max_rank`` (and its capacity).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice

import torch

from lorambo.allocation.components import at_most_per_layer
from lorambo.allocation.frozen import frozen_layers
from lorambo.allocation.validate import check_rank_bounds
from lorambo.distributed import SharedFailure, broadcast_, decision_generator, world_size
from lorambo.model.partial_edit import add_note, note_rank_changes_kept
from lorambo.nn.edit_snapshot import EditSnapshot
from lorambo.nn.optimizer_argument import each_optimizer, optimizer_argument
from lorambo.nn.optimizer_state import check_slot_state_editable
from lorambo.nn.pool_ops import keep_components_many
from lorambo.user_warnings import warns_when_done

__all__ = ["ALoRAConfig", "ALoRA", "alora_round"]


@dataclass(frozen=True)
class ALoRAConfig:
    """k1: steps before the first round; k2: steps between rounds; rounds: N_A; n_prune: n0."""

    k1: int = 100
    k2: int = 100
    rounds: int = 3
    n_prune: int = 1

    def __post_init__(self):
        for field in ("k1", "k2", "rounds", "n_prune"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < (0 if field == "k1" else 1):
                raise ValueError(f"ALoRAConfig.{field} must be an int >= {0 if field == 'k1' else 1}, got {v!r}")
            object.__setattr__(self, field, int(v))  # numpy integers become plain ints

    def decision_steps(self) -> list[int]:
        """The training steps at which the rounds run: ``k1 + j * k2`` for ``j < rounds``."""
        return [self.k1 + j * self.k2 for j in range(self.rounds)]


def check_round_settings(n_prune, budget) -> None:
    """ValueError naming the setting unless a round can use it: islice() would refuse a bad
    ``n_prune`` in its own words, and a NaN budget makes every move "not fit", so the round
    would silently do nothing."""
    if isinstance(n_prune, bool) or not isinstance(n_prune, numbers.Integral) or n_prune < 1:
        raise ValueError(f"ALoRA: n_prune={n_prune!r} must be an int >= 1")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not budget >= 0:
        raise ValueError(f"ALoRA: budget={budget!r} must be a number of parameters >= 0 (math.inf: no limit)")


def _plan(layers, scores, n_prune, budget, min_rank=0, max_rank=None, frozen=()):
    """(prune {name: [component]}, receive [name per freed rank]) conserving the rank sum; the
    ``frozen`` layers neither give nor take (allocation/frozen.py)."""
    costs = {n: m.in_features + m.out_features for n, m in layers.items()}
    left = budget - sum(costs[n] * m.rank for n, m in layers.items())
    frozen = set(frozen)
    ranked = sorted((float(s), n, k) for n, sc in scores.items() if n not in frozen for k, s in enumerate(sc.tolist()))
    # the worst first; a layer at min_rank keeps the rest of its components
    worst = list(islice(at_most_per_layer(ranked, lambda n: layers[n].rank - min_rank), n_prune))
    pruned_layers = {n for _, n, _ in worst}
    means = {n: float(sc.mean()) for n, sc in scores.items()
             if sc.numel() and n not in pruned_layers and n not in frozen}
    order = {n: i for i, n in enumerate(layers)}  # once: list(layers).index per key would be O(n^2)
    receivers = sorted(means, key=lambda n: (-means[n], order[n]))
    extra = dict.fromkeys(receivers, 0)
    top = {n: layers[n].capacity if max_rank is None else min(layers[n].capacity, max_rank) for n in receivers}
    prune, receive = {}, []
    turn = 0
    for _, donor, comp in worst:
        for j in range(len(receivers)):  # round robin from where the last freed rank went
            recv = receivers[(turn + j) % len(receivers)]
            fits = layers[recv].rank + extra[recv] < top[recv]
            if fits and left + costs[donor] - costs[recv] >= 0:
                prune.setdefault(donor, []).append(comp)
                receive.append(recv)
                extra[recv] += 1
                left += costs[donor] - costs[recv]
                turn = (turn + j + 1) % len(receivers)
                break
    return prune, receive


@warns_when_done  # a warning raised as an error must not stop a round half-way
def alora_round(model, layers: Mapping, loss_fn, batches, n_prune: int, budget: int | float = math.inf,
                optimizer=None, step=None, seed: int = 0, scores: Mapping | None = None,
                min_rank: int = 0, max_rank: int | None = None, records: list | None = None) -> list[dict]:
    """One ALoRA round in place; returns the decision records (``shrink`` / ``grow``).

    ``scores``: ``{name: tensor[rank]}`` to use instead of computing ablation scores.
    ``min_rank`` / ``max_rank``: no layer is pruned below / grown above them.
    ``records``: a list the records are appended to as each rank change is made (and returned),
    so that a caller keeps those of a round stopped part-way (out of memory, Ctrl-C).
    """
    check_rank_bounds(min_rank, max_rank)
    check_round_settings(n_prune, budget)
    if scores is None:
        from lorambo.sensitivity.ablation import ablation_scores

        # a pass inside the user's training step, under the user's own bar: none of its own
        scores = {n: a.score for n, a in ablation_scores(model, loss_fn, batches, list(layers), progress=False).items()}
    # checked on every process before the broadcast: one process's bad scores (or settings) must
    # not leave the others waiting in it, nor broadcast into tensors of another size
    failure = SharedFailure("alora_round", settings={
        "step": step, "n_prune": n_prune, "budget": budget, "seed": seed, "min_rank": min_rank,
        "max_rank": max_rank, "ranks": {n: (m.rank, m.capacity) for n, m in layers.items()},
        "frozen": frozen_layers(layers)})
    with failure:
        missing = [n for n in layers if n not in scores]
        if missing:
            raise ValueError(f"ALoRA scores lack layer(s) {missing[:5]}")
        scores = {n: torch.as_tensor(scores[n], dtype=torch.float64).cpu() for n in layers}
        for n, s in scores.items():
            if s.shape != (layers[n].rank,) or not torch.isfinite(s).all():
                raise ValueError(f"ALoRA scores of layer {n!r} must be {layers[n].rank} finite numbers, got {s}")
        optimizer = optimizer_argument(optimizer, "alora_round")
        for layer in layers.values():
            check_slot_state_editable(optimizer, layer)
    failure.check()
    # process 0's scores for everyone, in one broadcast: decisions must not hinge on last-bit
    # differences (DDP)
    flat = broadcast_(torch.cat([scores[n].reshape(-1) for n in layers] or [torch.zeros(0, dtype=torch.float64)]))
    scores = dict(zip(layers, flat.split([layers[n].rank for n in layers])))
    prune, receive = _plan(layers, scores, n_prune, budget, min_rank, max_rank, frozen_layers(layers))
    records = [] if records is None else records
    first_record = len(records)
    before = {n: layers[n].rank for n in prune}
    edited = [layers[n] for n in dict.fromkeys([*prune, *receive])]
    # out of memory on one process in the edits below is held back (failure.run) and raised on
    # every process by the last check; every process then takes its edits back, so that no
    # process goes on with other pools
    kept = failure.run(lambda: EditSnapshot.of_pools(edited, each_optimizer(optimizer))) if world_size() > 1 else None
    try:  # Ctrl-C part-way: the rank changes made are recorded and named
        try:
            failure.run(lambda: keep_components_many(
                [(layers[n], [k for k in range(layers[n].rank) if k not in comps]) for n, comps in prune.items()],
                optimizer))
        finally:  # each layer is shrunk whole or not at all: record those that were
            for name, comps in prune.items():
                if layers[name].rank != before[name]:
                    records.append({"step": step, "event": "shrink", "reason": "alora", "layer": name,
                                    "components": comps, "scores": [float(scores[name][k]) for k in comps],
                                    "old_rank": before[name], "new_rank": layers[name].rank})
        positions = {n: i for i, n in enumerate(layers)}
        for name in dict.fromkeys(receive):
            layer, add = layers[name], receive.count(name)
            gen = decision_generator(seed, "alora", step, positions[name])
            old = failure.run(lambda: layer.set_rank(layer.rank + add, optimizer=optimizer, generator=gen))
            if old is None:  # failed (held back): no further edit on this process
                break
            records.append({"step": step, "event": "grow", "reason": "alora", "layer": name,
                            "benefit": float(scores[name].mean()), "old_rank": old, "new_rank": layer.rank})
        failure.check()
    except BaseException as err:
        if isinstance(err, Exception) and kept is not None:  # under DDP: raised on every process
            kept.restore()
            del records[first_record:]
            add_note(err, f"alora_round (step {step}): every process took the round's rank changes back")
            raise
        note_rank_changes_kept(err, f"alora_round (step {step})", records,
                               " (and are in the decisions and the decision log of a LoRAMBoOptimizer)", "round")
        raise
    return records


class ALoRA:
    """The ALoRA schedule: call :meth:`step` once per optimizer step with the global step."""

    def __init__(self, model, layers: Mapping, loss_fn, heldout_batches, config: ALoRAConfig,
                 budget: int | float = math.inf, seed: int = 0, log=None, min_rank: int = 0,
                 max_rank: int | None = None):
        if loss_fn is None or heldout_batches is None:
            raise ValueError("ALoRA needs loss_fn and heldout_batches to score components by ablation")
        check_rank_bounds(min_rank, max_rank)
        check_round_settings(config.n_prune, budget)  # used at the first round, maybe hours in
        self.min_rank, self.max_rank = min_rank, max_rank
        self.model, self.layers, self.loss_fn = model, dict(layers), loss_fn
        self.batches, self.config, self.budget, self.seed, self.log = heldout_batches, config, budget, seed, log
        self.rounds_done = 0

    def is_decision_step(self, step: int) -> bool:
        return step in self.config.decision_steps()

    def step(self, global_step: int, optimizer=None) -> list[dict]:
        if not self.is_decision_step(global_step):
            return []
        records = []
        try:
            alora_round(self.model, self.layers, self.loss_fn, self.batches, self.config.n_prune, self.budget,
                        optimizer, global_step, self.seed, min_rank=self.min_rank, max_rank=self.max_rank,
                        records=records)
        finally:  # a round stopped part-way: the rank changes it made are logged all the same
            if self.log is not None:
                self.log.extend(records)
        self.rounds_done += 1
        return records

"""lorambo's allocators as experiment methods, all through :class:`lorambo.LoRAMBoOptimizer`.

- ``uniform``: one water level for every layer (``allocate(method="uniform")``).
- ``gradient`` / ``hessian`` / ``data`` / ``frobenius``: the closed-form square-root law
  ``r_i ∝ sqrt(s_i / (d_i + k_i))`` on that sensitivity, measured before training.
- ``online``: start uniform with ``online_initial`` of P, then the online greedy allocator grows
  ranks in place (best ``Δ_i / (d_i + k_i)`` first) at decision steps until P is spent.
- ``moves``: start uniform at P, then rank moves at decision steps: the components with the
  lowest AdaLoRA importance fund one more rank of the layers with the best online gain per
  parameter (``MOVES_PER_DECISION`` per decision; moves go one way per layer).
- ``moves_ablation``: the same moves, with the components scored by the allocator's own ablation:
  the loss each one's removal costs on the validation batches ALoRA uses (``heldout_batches``).
- ``probe``: the greedy knapsack over the singular directions of a short all-layer probe LoRA's
  updates, each worth its share of the loss its layer's update carries (``probe.py``);
  ``probe_sqrt``: the square-root law on those per-layer losses.
- ``alora``: start uniform at P, then ALoRA rounds prune the worst components (AB-LoRA ablation
  on validation batches) and give their ranks to the most important modules.

Ranks ``0`` are allowed (the layer still exists, with nothing active). Pools hold
``growth_factor`` times the allocated rank (at least 8) for the methods that grow.
"""

from __future__ import annotations

import math

from lorambo.allocation.alora import ALoRAConfig
from lorambo.experiments.methods import Method, ranks_by_short, schedule
from lorambo.model import lora_layers
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance


class LoRAMBoMethod(Method):
    allocation = "uniform"
    sensitivity = "gradient"

    def optimizer(self, student, **kw) -> LoRAMBoOptimizer:
        cfg = self.ctx.cfg
        return LoRAMBoOptimizer(student, total_budget=self.ctx.budget, sensitivity_method=self.sensitivity,
                                target_modules=self.ctx.task.names, allocation=self.allocation,
                                growth_factor=cfg.growth_factor, seed=self.ctx.seed, **kw)

    def setup(self, student):
        self.model = student
        self.opt = self.optimizer(student)
        self.opt.compute_optimal_ranks(**self.allocation_inputs())
        self.opt.configure()
        return student

    def allocation_inputs(self) -> dict:
        """What the allocator reads, as keyword arguments of ``compute_optimal_ranks``."""
        return {}

    def final_ranks(self) -> dict[str, int]:
        return ranks_by_short({n: m.rank for n, m in lora_layers(self.model).items()})

    def trainable_lora_params(self) -> int:
        return sum(m.lora_A[:m.rank].numel() + m.lora_B[:, :m.rank].numel() for m in lora_layers(self.model).values())


class Uniform(LoRAMBoMethod):
    name = "uniform"


class ClosedForm(LoRAMBoMethod):
    allocation = "closed_form"

    def allocation_inputs(self) -> dict:
        return {"sensitivities": self.ctx.sensitivities[self.sensitivity]}


def closed_form_method(sensitivity: str) -> type[ClosedForm]:
    """The closed-form method on ``sensitivity`` (named after it)."""
    return type(f"ClosedForm_{sensitivity}", (ClosedForm,), {"name": sensitivity, "sensitivity": sensitivity})


class Probe(LoRAMBoMethod):
    """The knapsack over the probe's directions (``probe.py``): gain per parameter of each singular
    direction of a short all-layer LoRA's updates, measured before the run."""

    name = "probe"
    allocation = "knapsack"

    def allocation_inputs(self) -> dict:
        return {"benefits": self.ctx.sensitivities["probe"]}


class ProbeSqrt(ClosedForm):
    """The square-root law on the probe's removal scores (``probe.py``): the loss each layer's
    update carries after a short all-layer LoRA, measured before the run."""

    name = "probe_sqrt"

    def allocation_inputs(self) -> dict:
        return {"sensitivities": self.ctx.sensitivities["probe_sqrt"]}


class Online(LoRAMBoMethod):
    name = "online"

    def setup(self, student):
        s = schedule(self.ctx.cfg.steps)
        self.model = student
        initial = max(int(self.ctx.cfg.online_initial * self.ctx.budget), min(self.ctx.costs.values()))
        self.opt = self.optimizer(student, initial_budget=initial, warmup_steps=s["warmup"],
                                  interval=s["interval"], stop_step=s["stop"], loss_improvement_threshold=0.0)
        self.opt.compute_optimal_ranks()
        self.opt.configure()
        return student

    def capture(self, step, batch):
        # the batch's attention mask keeps pads out of the captured X and dY, as a user's loop would
        return self.opt.capture(step, batch)

    def after_backward(self, step, optimizer):
        self.opt.step(step, optimizer=optimizer)


MOVES_PER_DECISION = 4


class Moves(Online):
    name = "moves"

    def setup(self, student):
        s = schedule(self.ctx.cfg.steps)
        self.model = student
        # every component is a candidate (move_threshold=inf): the lowest scores move first,
        # MOVES_PER_DECISION ranks at a time, at twice online growth's decisions per run
        self.opt = self.optimizer(student, warmup_steps=s["warmup"], interval=max(1, s["interval"] // 2),
                                  stop_step=s["stop"], loss_improvement_threshold=0.0, move_threshold=math.inf,
                                  max_moves=MOVES_PER_DECISION, **self.scoring())
        self.opt.compute_optimal_ranks()
        self.opt.configure()
        self.importance = None if self.scoring() else AdaLoRAImportance(student)
        return student

    def scoring(self) -> dict:
        """Keyword arguments of the allocator for scoring components (none: passed at each step)."""
        return {}

    def after_backward(self, step, optimizer):
        self.importance.update()
        scores = self.importance.component_scores() if self.opt.is_decision_step(step) else None
        self.importance.follow(self.opt.step(step, optimizer=optimizer, component_scores=scores))


class MovesAblation(Moves):
    """Rank moves as ``moves``, whose components are scored by the allocator's own ablation (the
    loss each one's removal costs on the ALoRA validation batches) instead of AdaLoRA importance."""

    name = "moves_ablation"

    def scoring(self) -> dict:
        return {"heldout_batches": self.ctx.heldout, "loss_fn": self.ctx.task.loss}

    def after_backward(self, step, optimizer):
        self.opt.step(step, optimizer=optimizer)


class ALoRA(LoRAMBoMethod):
    name = "alora"
    allocation = "alora"

    def setup(self, student):
        cfg = self.ctx.cfg
        self.model = student
        every = max(1, cfg.steps // (cfg.alora_rounds + 2))  # rounds, then time to fine-tune
        self.opt = self.optimizer(student, heldout_batches=self.ctx.heldout, loss_fn=self.ctx.task.loss)
        ranks = self.opt.compute_optimal_ranks()              # uniform start at P
        n_prune = max(1, math.ceil(cfg.alora_prune * sum(ranks.values())))
        self.opt.alora_config = ALoRAConfig(k1=every, k2=every, rounds=cfg.alora_rounds, n_prune=n_prune)
        self.opt.configure()
        return student

    def after_backward(self, step, optimizer):
        self.opt.step(step, optimizer=optimizer)


class Oracle(LoRAMBoMethod):
    """Reference, not an allocator: the planted ranks (planted task), trained like the rest.

    At a budget of ``k P*`` (``P*`` = the planted ranks' cost) every planted rank is multiplied by
    ``k``, so the oracle spends exactly P like every other method; a budget at which some
    ``k r_i`` is not a whole number is refused (no method could then be compared at equal P)."""

    name = "oracle"

    def setup(self, student):
        from lorambo.model import configure_model
        from lorambo.experiments.student import PREFIX

        planted = getattr(self.ctx.task, "planted", None)
        if not planted:
            raise ValueError("the oracle method needs a task with planted ranks (the planted task)")
        self.model = student
        configure_model(student, {PREFIX + n: r for n, r in oracle_ranks(planted, self.ctx.task.dims,
                                                                           self.ctx.budget).items()})
        return student

    def final_ranks(self) -> dict[str, int]:
        ranks = dict.fromkeys(self.ctx.task.dims, 0)
        ranks.update(super().final_ranks())
        return ranks


def oracle_ranks(planted: dict[str, int], dims: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """The planted ranks times ``k = budget / P*``; ``ValueError`` unless every ``k r_i`` is whole."""
    p_star = sum(r * sum(dims[n]) for n, r in planted.items())
    k = budget / p_star
    ranks = {n: round(k * r) for n, r in planted.items()}
    if any(abs(k * r - ranks[n]) > 1e-9 for n, r in planted.items()) or min(ranks.values()) < 1:
        raise ValueError(f"oracle: budget P = {budget:,} is {k:.4g} x the planted cost P* = {p_star:,}; the "
                         f"planted ranks {planted} scaled by it are not whole numbers >= 1 (use budgets "
                         "whose P is a whole multiple of P*, e.g. budget levels 0.5, 1, 2 on MiniLM)")
    return ranks

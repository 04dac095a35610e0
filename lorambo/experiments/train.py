"""One run: a method, a budget, a seed and a learning rate, trained and scored.

The loop is the same for every method (lorambo.optim.AdamW, no weight decay, ``cfg.steps`` steps over the
seed's batch stream); methods only plug into it through the hooks of
:class:`~lorambo.experiments.methods.Method`.

A run *diverges* when its training loss, or a number of its final validation or test scores,
is not finite. A run of the learning-rate grid that diverges is a result: its record says so
(:func:`diverged_record`) and the selection skips it. A run at a selected rate that diverges is
a failure: ``FloatingPointError`` naming the run.
"""

from __future__ import annotations

import math
import time

from lorambo.experiments.methods import Method, RunContext, spent
from lorambo.experiments.registry import make_method
from lorambo.optim import AdamW


def _non_finite(scores: dict) -> tuple[str, float] | None:
    """The first non-finite number of ``{split: {metric: value} or None}`` as ("split metric", value)."""
    for split, metrics in scores.items():
        for name, value in (metrics or {}).items():
            if not math.isfinite(value):
                return f"{split} {name}", value
    return None


def diverged_record(ctx: RunContext, method_name: str, lr: float, step: int, value: float, where: str,
                    losses: list, started: float) -> dict:
    """The record of a grid run that diverged: ``diverged_step`` (the step whose training loss was
    non-finite, or ``steps`` when only the final scores were), ``diverged_value`` ("nan", "inf"
    or "-inf": JSON holds no non-finite number) and ``diverged_where``; no scores, ranks or
    validation curve, the finite training losses before ``diverged_step``."""
    seconds = time.perf_counter() - started
    return {"task": ctx.task.name, "method": method_name, "level": ctx.level, "budget": ctx.budget,
            "seed": ctx.seed, "lr": lr, "diverged": True, "diverged_step": step, "diverged_value": str(float(value)),
            "diverged_where": where, "val": None, "test": None, "metric": None, "val_metric": None,
            "train_loss": losses, "val_curve": [], "train_seconds": seconds, "seconds": seconds}


def train_run(ctx: RunContext, method_name: str, lr: float, batches: list, score_val: bool = True,
              record_divergence: bool = False) -> dict:
    """Train one run and return every number about it (JSON-ready). ``score_val=False`` skips the
    validation split (only the learning-rate search reads it). With ``cfg.val_every`` > 0 the
    validation split is also scored every ``val_every`` steps (``val_curve``: [[step, metric]]).
    A run that diverges returns :func:`diverged_record` with ``record_divergence`` (a grid run),
    else raises ``FloatingPointError``."""
    started = time.perf_counter()
    task, cfg = ctx.task, ctx.cfg
    student = task.fresh_student(ctx.seed)
    method: Method = make_method(method_name, ctx)
    model = method.setup(student)
    model.eval()  # no dropout: the same deterministic function for every method
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=lr, weight_decay=0.0)  # per-slot Adam steps for grown slots
    losses, curve, curve_seconds = [], [], 0.0
    every = cfg.val_every if score_val else 0

    def diverged(step: int, value: float, where: str) -> dict:
        if record_divergence:
            return diverged_record(ctx, method_name, lr, step, value, where, losses, started)
        raise FloatingPointError(f"{task.name}: {method_name} at budget level {ctx.level:g}, seed {ctx.seed}, "
                                 f"lr {lr:g}: {where} {value} at step {step}: the run diverged")

    for step, batch in enumerate(batches):
        with method.capture(step, batch):
            loss = task.loss(model, batch)
            value = loss.item()  # checked before backward: no method hook sees non-finite gradients
            if math.isfinite(value):
                extra = method.extra_loss(model)
                (loss if extra is None else loss + extra).backward()
        if not math.isfinite(value):
            return diverged(step, value, "training loss")
        method.after_backward(step, optimizer)
        optimizer.step()
        method.after_step(step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        if every and (step + 1) % every == 0 and step + 1 < len(batches):
            t0 = time.perf_counter()
            curve.append([step + 1, task.evaluate(model, "val")[task.metric]])
            curve_seconds += time.perf_counter() - t0
    trained = time.perf_counter() - started - curve_seconds
    val = task.evaluate(model, "val") if score_val else None
    test = task.evaluate(model, "test")
    bad = _non_finite({"val": val, "test": test})  # the last update alone can break the model
    if bad is not None:
        return diverged(len(batches), bad[1], f"final {bad[0]}")
    if every:
        curve.append([len(batches), val[task.metric]])
    ranks = method.final_ranks()
    used = spent(ranks, task.dims)
    counted = method.trainable_lora_params()
    if used > ctx.budget:
        raise AssertionError(f"{method_name} spent {used} > budget {ctx.budget}")
    if counted != used:
        raise AssertionError(f"{method_name}: ranks say {used} LoRA parameters, the model holds {counted}")
    return {
        "task": task.name, "method": method_name, "level": ctx.level, "budget": ctx.budget, "seed": ctx.seed,
        "lr": lr, "diverged": False, "val": val, "test": test, "metric": test[task.metric],
        "val_metric": None if val is None else val[task.metric],
        "spent": used, "ranks": ranks, **task.extra_metrics(ranks), "train_loss": losses, "val_curve": curve,
        "train_seconds": trained, "seconds": time.perf_counter() - started,
    }

"""One run: a method, a budget, a seed and a learning rate, trained and scored.

The loop is the same for every method (lorambo.optim.AdamW, no weight decay, ``cfg.steps`` steps over the
seed's batch stream); methods only plug into it through the hooks of
:class:`~lorambo.experiments.methods.Method`.
"""

from __future__ import annotations

import math
import time

from lorambo.experiments.methods import Method, RunContext, spent
from lorambo.experiments.registry import make_method
from lorambo.optim import AdamW


def train_run(ctx: RunContext, method_name: str, lr: float, batches: list, score_val: bool = True) -> dict:
    """Train one run and return every number about it (JSON-ready). ``score_val=False`` skips the
    validation split (only the learning-rate search reads it). With ``cfg.val_every`` > 0 the
    validation split is also scored every ``val_every`` steps (``val_curve``: [[step, metric]])."""
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
    for step, batch in enumerate(batches):
        with method.capture(step):
            loss = task.loss(model, batch)
            extra = method.extra_loss(model)
            (loss if extra is None else loss + extra).backward()
        method.after_backward(step, optimizer)
        optimizer.step()
        method.after_step(step)
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{method_name} at lr {lr}: training loss {value} at step {step}")
        losses.append(value)
        if every and (step + 1) % every == 0 and step + 1 < len(batches):
            t0 = time.perf_counter()
            curve.append([step + 1, task.evaluate(model, "val")[task.metric]])
            curve_seconds += time.perf_counter() - t0
    trained = time.perf_counter() - started - curve_seconds
    val = task.evaluate(model, "val") if score_val else None
    if every:
        curve.append([len(batches), val[task.metric]])
    test = task.evaluate(model, "test")
    ranks = method.final_ranks()
    used = spent(ranks, task.dims)
    counted = method.trainable_lora_params()
    if used > ctx.budget:
        raise AssertionError(f"{method_name} spent {used} > budget {ctx.budget}")
    if counted != used:
        raise AssertionError(f"{method_name}: ranks say {used} LoRA parameters, the model holds {counted}")
    return {
        "task": task.name, "method": method_name, "level": ctx.level, "budget": ctx.budget, "seed": ctx.seed,
        "lr": lr, "val": val, "test": test, "metric": test[task.metric],
        "val_metric": None if val is None else val[task.metric],
        "spent": used, "ranks": ranks, **task.extra_metrics(ranks), "train_loss": losses, "val_curve": curve,
        "train_seconds": trained, "seconds": time.perf_counter() - started,
    }

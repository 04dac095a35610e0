"""Allocation methods as interchangeable run strategies, all held to one parameter budget P.

A method turns a fresh :class:`~lorambo.experiments.student.Student` into a trainable model
(:meth:`Method.setup`), hooks into the training loop (``capture`` around forward+backward,
``after_backward`` before the optimizer step, ``after_step`` after it, ``extra_loss``), and reports
its final ranks ``{short name: rank}``. Budget accounting is the same for all:
``spent = sum_i r_i (d_i + k_i)`` over the final ranks, never above P.

lorambo methods live in ``methods_lorambo.py``, peft's AdaLoRA and EVA in ``methods_peft.py``;
``registry.py`` names them all. Those modules import this one, never the other way round.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from lorambo.experiments.config import CLOSED_FORM, ExperimentConfig
from lorambo.experiments.student import short


@dataclass
class RunContext:
    """What a method may use: the same for every method of one (task, budget, seed)."""

    task: object
    cfg: ExperimentConfig
    level: float
    budget: int
    seed: int
    calib: list                       # calibration batches (sensitivities, EVA's SVD)
    heldout: list                     # validation batches (ALoRA)
    sensitivities: dict = field(default_factory=dict)   # {method: {Student name: s_i}}
    cache: dict = field(default_factory=dict)           # per task: data-only results (EVA's SVD)

    @property
    def costs(self) -> dict[str, int]:
        return {n: sum(dims) for n, dims in self.task.dims.items()}


class Method:
    name = ""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def setup(self, student) -> torch.nn.Module:
        raise NotImplementedError

    def capture(self, step: int, batch):
        """Wraps the forward and backward of ``step`` on ``batch`` (nothing by default)."""
        return contextlib.nullcontext()

    def after_backward(self, step: int, optimizer) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def extra_loss(self, model):
        return None

    def final_ranks(self) -> dict[str, int]:
        raise NotImplementedError

    def trainable_lora_params(self) -> int:
        """Count of LoRA parameters that carry the final adapter, read from the model itself."""
        raise NotImplementedError


def budget_of(level: float, dims: dict[str, tuple[int, int]]) -> int:
    """P for a budget level (mean rank per module), with a clear error when it buys nothing."""
    total = sum(d + k for d, k in dims.values())
    budget = int(round(level * total))
    cheapest = min(d + k for d, k in dims.values())
    if budget < cheapest:
        raise ValueError(f"budget level {level} gives P = {budget} parameters, below the cost of one "
                         f"rank in the cheapest layer ({cheapest}): no method can place any rank")
    return budget


def spent(ranks: dict[str, int], dims: dict[str, tuple[int, int]]) -> int:
    return sum(int(r) * (dims[n][0] + dims[n][1]) for n, r in ranks.items())


def compute_sensitivities(task, cfg: ExperimentConfig, seed: int, calib: list, methods, stream=None
                          ) -> tuple[dict, dict]:
    """({method: {Student name: s_i}}, {method: seconds}) for the closed-form methods asked for,
    measured once per (task, seed) on the pretrained model (+ probe head) and reused for every
    budget. Negative Hessian-trace estimates are set to 0 by LoRAMBoOptimizer (recorded).
    The probe (``probe.py``) trains on the first ``probe_steps`` batches of ``stream`` (the seed's
    training batches) once for both probe rules: its per-direction gains go under "probe", its
    per-layer removal scores under "probe_sqrt"."""
    from lorambo.optimizer import LoRAMBoOptimizer

    out, seconds = {}, {}
    if {"probe", "probe_sqrt"} & set(methods):
        from lorambo.experiments.probe import probe_sensitivity

        if stream is None:
            raise ValueError("the probe sensitivity needs the seed's training batches (stream)")
        probe = probe_sensitivity(task, cfg, seed, stream)
        out["probe"], out["probe_sqrt"] = probe["gains"], probe["removal"]
        seconds["probe"] = probe["seconds"]
    for method in [m for m in methods if m in CLOSED_FORM]:
        student = task.fresh_student(seed)
        student.eval()
        if method == "hessian":  # exact HVPs need double backward; CPU SDPA attention has none
            student.bert.set_attn_implementation("eager")
        opt = LoRAMBoOptimizer(student, total_budget=sum(sum(d) for d in task.dims.values()),
                               sensitivity_method=method, target_modules=task.names,
                               num_probes=cfg.hessian_probes, seed=seed)
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            # the experiment's bar is the one shown (a worker's bar would draw over it)
            out[method] = opt.compute_sensitivities(calib, task.loss, progress=False)
        seconds[method] = time.perf_counter() - started
        if any("negative Hessian" in str(w.message) for w in caught):
            out.setdefault("_notes", []).append(f"{method}: negative trace estimates clipped to 0")
        for w in caught:  # recording took every warning: pass on those the notes do not hold
            if "negative Hessian" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return out, seconds


def ranks_by_short(ranks: dict[str, int]) -> dict[str, int]:
    return {short(n): int(r) for n, r in ranks.items()}


def schedule(steps: int) -> dict:
    """Decision steps shared by the adaptive schedules (a fifth / a third of the run)."""
    fifth, third = max(1, steps // 5), max(1, steps // 3)
    return {"warmup": fifth, "interval": fifth, "stop": max(fifth + 1, steps // 2 + 1),
            "k1": third, "k2": third, "tinit": fifth, "tfinal": fifth}


def ceil_level(level: float) -> int:
    return max(1, math.ceil(level - 1e-9))

"""``lorambo demo``: the experiment at its default size (``--full``: GPU size).

It compares, on the real all-MiniLM-L6-v2 and at equal LoRA parameter budgets, uniform LoRA with
lorambo's closed-form allocations (gradient, Hessian trace, data covariance, Frobenius), online
greedy growth, ALoRA, and peft's AdaLoRA and EVA, on a planted-structure task and a real labeled
task; it prints the results table and writes plots and a JSON of every number under
``runs/<timestamp>/``. ``lorambo demo --growth`` runs the in-place rank-growth proof instead
(``growth.py``).
"""

from __future__ import annotations

from lorambo.experiments import config as presets


def run_demo(full: bool = False, out_dir=None, progress: bool | None = None, **changes) -> dict:
    """Run the default (or ``full``) experiment; keyword changes override config fields."""
    from lorambo.experiments.runner import run_experiment

    cfg = (presets.full() if full else presets.default()).replace(**changes) if changes else \
        (presets.full() if full else presets.default())
    return run_experiment(cfg, out_dir=out_dir, progress=progress)

"""``lorambo demo``: the experiment at its default size (``--full``: GPU size).

On the real all-MiniLM-L6-v2, with low-rank deltas planted in 4 of its 36 layers, it trains
uniform LoRA, the oracle (the planted ranks), the closed-form allocations from gradient and
Hessian-trace sensitivities, online greedy growth, ALoRA and the probe allocation at the planted
deltas' cost P*, and reports the share of the uniform-to-oracle gap each closes; it prints the
table and writes plots, ``demo_results.json`` and ``results.json`` under ``runs/<timestamp>/``.
``lorambo demo --growth`` runs the in-place rank-growth proof instead (``growth.py``).
"""

from __future__ import annotations

from lorambo.experiments import config as presets


def run_demo(full: bool = False, out_dir=None, progress: bool | None = None, **changes) -> dict:
    """Run the default (or ``full``) experiment; keyword changes override config fields."""
    from lorambo.experiments.runner import run_experiment
    from lorambo.sensitivity.progress import check_progress

    check_progress(progress, "run_demo")
    cfg = (presets.full() if full else presets.default()).replace(**changes) if changes else \
        (presets.full() if full else presets.default())
    return run_experiment(cfg, out_dir=out_dir, progress=progress)

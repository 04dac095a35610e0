"""A task's result, built from the journal's records alone (no model, no data).

The runs are replayed in plan order, so the result (the run list, the learning-rate choices and
their order, the summary) is the same whichever order or process recorded them. Grid runs that
diverged stay in the run list and are listed under ``diverged``; no choice or summary reads them.
"""

from __future__ import annotations

from lorambo.experiments import results as res
from lorambo.experiments.config import ExperimentConfig
from lorambo.experiments.units import best_lr, plan, run_key, selected_lr, sens_seeds, task_methods, unit_key


DIVERGED_FIELDS = ("method", "level", "seed", "lr", "diverged_step", "diverged_value", "diverged_where")


def _select(runs, lr_choice, method, level, cfg) -> None:
    """After the grid of (method, level) on seed 0 is complete, keep the lowest validation loss
    (never a run that diverged)."""
    key = str(level)
    if key in lr_choice[method]:
        return
    grid = [r for r in runs if r["method"] == method and r["level"] == level and r["seed"] == 0]
    if len(grid) >= len(cfg.lr_grid):
        lr_choice[method][key] = best_lr(grid)


def task_result(cfg: ExperimentConfig, name: str, records) -> dict:
    """The result dict of one task (as ``results.json`` holds it) from a complete journal."""
    meta = records.get(unit_key({"kind": "task", "task": name}, cfg))
    levels = list(cfg.budgets)
    methods = task_methods(cfg, name)
    sens_records = {seed: records.get(unit_key({"kind": "sens", "task": name, "seed": seed}, cfg))
                    for seed in sens_seeds(cfg)}
    sens = {seed: r["sens"] for seed, r in sens_records.items()}
    sens_seconds = {seed: r["seconds"] for seed, r in sens_records.items()}
    runs, lr_choice = [], {m: {} for m in methods}
    for method, li, seed, lr in plan(cfg, name):
        run = records.get(run_key(cfg, name, method, li, seed, lr))["run"]
        level = levels[li]
        if lr is None:  # the rule the scheduler ran it by (units.grid_of)
            lr = selected_lr(cfg, name, method, li, records)
            lr_choice[method].setdefault(str(level), lr)
        if run["lr"] != lr:
            raise RuntimeError(f"journal: {name} {method} level {level:g} seed {seed} ran at lr {run['lr']}, "
                               f"but its grid selects {lr}")
        runs.append(run)
        _select(runs, lr_choice, method, level, cfg)
    summary = res.summarize(runs, lr_choice, methods, levels, meta["higher_is_better"])
    tr = {"task": name, "metric": meta["metric"], "higher_is_better": meta["higher_is_better"],
          "seeds": cfg.seeds, "budgets": meta["budgets"], "dims": meta["dims"], "describe": meta["describe"],
          "sensitivity_seconds": sens_seconds,
          "sensitivity_seconds_total": sum(sum(v.values()) for v in sens_seconds.values()),
          "sensitivities": {str(s): {m: {k.replace("bert.encoder.", ""): v for k, v in vals.items()}
                                     for m, vals in per.items() if not m.startswith("_")}
                            for s, per in sens.items()},
          "methods": list(methods),
          "notes": sorted({n for per in sens.values() for n in per.get("_notes", [])}),
          "lr_choice": lr_choice, "runs": runs, "summary": summary,
          "diverged": [{k: r[k] for k in DIVERGED_FIELDS} for r in runs if r.get("diverged")],
          "run_seconds": sum(r["seconds"] for r in runs), "baselines": meta["baselines"]}
    tr["verdicts"] = res.verdicts(name, summary, levels, meta["higher_is_better"])
    tr["setup_seconds"] = meta["setup_seconds"]
    return tr

"""An experiment as units of work, and when each unit may start.

Units are plain dicts (they travel to worker processes):

- ``{"kind": "task", "task": t}``: build task ``t`` (data, targets, probe head) and record what
  its result needs besides the runs;
- ``{"kind": "sens", "task": t, "seed": s}``: the sensitivities measured on seed ``s``'s
  calibration batches (seed 0 only, unless ``sensitivities_per_seed``);
- ``{"kind": "run", "task": t, "method": m, "li": i, "seed": s, "lr": lr}``: one training run;
  ``lr`` None means the rate selected on seed 0's grid (:func:`grid_of`).

Dependencies: a run waits for the ``sens`` unit of its seed (whatever its method reads from it);
a run at the selected rate waits for every run of the grid it is selected from, and can never
start when every run of that grid diverged (``train.py``). Given
those inputs every unit is a deterministic function of the configuration and its seed, whatever
process runs it and in whatever order: one worker or several, interrupted and resumed or not,
record the same numbers (bit for bit on CPU).
"""

from __future__ import annotations

import json

from lorambo.experiments.config import REFERENCE, ExperimentConfig


def task_methods(cfg: ExperimentConfig, task: str) -> tuple[str, ...]:
    """The oracle needs planted ranks: it runs on the planted task only."""
    return tuple(m for m in cfg.methods if not (m in REFERENCE and task != "planted"))


def plan(cfg: ExperimentConfig, task: str = "planted") -> list[tuple]:
    """Every run as (method, level index, seed, lr or None = 'the selected lr'), in execution order.
    With ``lr_search="uniform"`` uniform LoRA runs first (the grid on seed 0 at the first budget)
    and every other method then runs at its choice only."""
    methods = task_methods(cfg, task)
    if cfg.lr_search == "uniform":
        methods = ("uniform",) + tuple(m for m in methods if m != "uniform")
    out = []
    for method in methods:
        for li in range(len(cfg.budgets)):
            if cfg.lr_search == "uniform":
                search = method == "uniform" and li == 0
            else:
                search = cfg.lr_search == "per_budget" or li == 0
            if search:  # the grid on seed 0 (a grid of one is just seed 0's run)
                out += [(method, li, 0, lr) for lr in cfg.lr_grid]
            out += [(method, li, s, None) for s in range(1 if search else 0, cfg.seeds)]
    return out


def sens_seeds(cfg: ExperimentConfig) -> list[int]:
    return list(range(cfg.seeds)) if cfg.sensitivities_per_seed else [0]


def all_units(cfg: ExperimentConfig) -> list[dict]:
    """Every unit, in the order they are handed out: the task setups, the sensitivities, the grid
    runs, then the runs at selected rates (each list in plan order)."""
    tasks = [{"kind": "task", "task": t} for t in cfg.tasks]
    sens = [{"kind": "sens", "task": t, "seed": s} for t in cfg.tasks for s in sens_seeds(cfg)]
    runs = [{"kind": "run", "task": t, "method": m, "li": li, "seed": seed, "lr": lr}
            for t in cfg.tasks for m, li, seed, lr in plan(cfg, t)]
    return tasks + sens + [u for u in runs if u["lr"] is not None] + [u for u in runs if u["lr"] is None]


def unit_key(unit: dict, cfg: ExperimentConfig) -> str:
    """The journal key: kind, task and, for runs, method, budget level, seed and lr or "selected"."""
    if unit["kind"] == "task":
        parts = ["task", unit["task"]]
    elif unit["kind"] == "sens":
        parts = ["sens", unit["task"], unit["seed"]]
    else:
        lr = "selected" if unit["lr"] is None else float(unit["lr"])
        parts = ["run", unit["task"], unit["method"], float(cfg.budgets[unit["li"]]), unit["seed"], lr]
    return json.dumps(parts)


def run_key(cfg: ExperimentConfig, task: str, method: str, li: int, seed: int, lr) -> str:
    return unit_key({"kind": "run", "task": task, "method": method, "li": li, "seed": seed, "lr": lr}, cfg)


def sens_seed(cfg: ExperimentConfig, seed: int) -> int:
    """The seed whose sensitivities a run of ``seed`` allocates from."""
    return seed if cfg.sensitivities_per_seed else 0


def grid_of(cfg: ExperimentConfig, method: str, li: int) -> tuple[str, int]:
    """(method, level index) of the grid a selected rate comes from: uniform LoRA's at the first
    budget (``lr_search="uniform"``), the method's own at this budget (``per_budget``, or the first
    budget) or at the first budget (``first_budget``)."""
    if cfg.lr_search == "uniform":
        return "uniform", 0
    if cfg.lr_search == "per_budget" or li == 0:
        return method, li
    return method, 0


class GridDivergedError(FloatingPointError):
    """Every run of a learning-rate grid diverged: no rate can be selected from it."""


def diverged_grid_message(grid: list[dict]) -> str:
    """Names the grid (task, method, budget level) and how each of its rates diverged."""
    first = grid[0]
    how = "; ".join(f"lr {r['lr']:g}: {r['diverged_where']} {r['diverged_value']} at step {r['diverged_step']}"
                    for r in sorted(grid, key=lambda r: r["lr"]))
    return (f"{first['task']}: every learning rate of {first['method']}'s grid at budget level {first['level']:g} "
            f"diverged ({how}): no rate can be selected; lower the grid (--lrs) and start a new --out")


def best_lr(grid: list[dict]) -> float:
    """The grid run with the lowest validation loss (ties: the lower rate) gives the rate. A run
    that diverged counts as an infinite loss: it is never selected, and a grid where every run
    diverged raises :class:`GridDivergedError`."""
    finite = [r for r in grid if not r.get("diverged")]
    if not finite:
        raise GridDivergedError(diverged_grid_message(grid))
    best = min(finite, key=lambda r: (r["val"].get("loss", r["val"].get("rel_loss")), r["lr"]))
    return best["lr"]


def selected_lr(cfg: ExperimentConfig, task: str, method: str, li: int, records) -> float | None:
    """The rate selected for (method, level), or None while its grid is incomplete
    (:class:`GridDivergedError` when every rate of it diverged)."""
    gm, gli = grid_of(cfg, method, li)
    grid = [records.get(run_key(cfg, task, gm, gli, 0, lr)) for lr in cfg.lr_grid]
    if any(r is None for r in grid):
        return None
    return best_lr([r["run"] for r in grid])


def inputs(unit: dict, cfg: ExperimentConfig, records) -> dict | None:
    """The unit with what it reads from other units (``sens``, the selected ``lr``), or None while
    one of them is not recorded yet; :class:`GridDivergedError` when its grid has no rate to give."""
    if unit["kind"] != "run":
        return dict(unit)
    sens = records.get(unit_key({"kind": "sens", "task": unit["task"], "seed": sens_seed(cfg, unit["seed"])}, cfg))
    if sens is None:
        return None
    out = dict(unit, sens=sens["sens"], selected=unit["lr"] is None)
    if unit["lr"] is None:
        out["lr"] = selected_lr(cfg, unit["task"], unit["method"], unit["li"], records)
        if out["lr"] is None:
            return None
    return out

"""With ``lr_search="per_budget"`` every (method, budget) picks its learning rate on its own seed-0
grid (lorambo/experiments/assemble.py): a choice must never read another method's or another
budget's runs. Built on a made-up journal (no model), so that each grid's best rate differs from
its neighbours'."""

import random

import pytest

from lorambo.experiments import journal
from lorambo.experiments.assemble import task_result
from lorambo.experiments.config import ExperimentConfig
from lorambo.experiments.units import plan, run_key, unit_key

CFG = ExperimentConfig(tasks=("planted",), methods=("uniform", "gradient"), budgets=(1.0, 2.0), seeds=2,
                       lr_grid=(1e-3, 1e-2), lr_search="per_budget")
LAYERS = {"layer.0.attention.self.query": (8, 8), "layer.0.output.dense": (8, 8)}
# each grid's best rate (lowest validation loss) is not its neighbour's: uniform and gradient
# disagree at each budget, and each method's choice changes between the budgets
BEST = {("uniform", 1.0): 1e-3, ("uniform", 2.0): 1e-2, ("gradient", 1.0): 1e-2, ("gradient", 2.0): 1e-3}


def _run(rng, method, level, seed, lr):
    # the grid's other rate scores far worse than any run at its best, so a choice read from
    # the wrong runs lands on the other rate
    loss = rng.uniform(0.1, 0.2) if lr == BEST[(method, level)] else rng.uniform(0.6, 0.9)
    return {"task": "planted", "method": method, "level": level, "seed": seed, "lr": lr,
            "budget": int(level * 32), "val": {"rel_loss": loss}, "metric": rng.uniform(0.1, 0.9),
            "spent": int(level * 32), "ranks": {n: rng.randint(0, 4) for n in LAYERS},
            "seconds": rng.uniform(0.5, 2.0), "diverged": False}


def made_up_journal(cfg: ExperimentConfig, seed: int = 0) -> journal.Records:
    rng = random.Random(seed)
    records = [{"kind": "task", "key": unit_key({"kind": "task", "task": "planted"}, cfg), "metric": "rel_loss",
                "higher_is_better": False, "budgets": {str(b): int(b * 32) for b in cfg.budgets},
                "dims": {n: list(d) for n, d in LAYERS.items()}, "describe": {"planted_ranks": {}},
                "baselines": {}, "setup_seconds": 1.0},
               {"kind": "sens", "key": unit_key({"kind": "sens", "task": "planted", "seed": 0}, cfg),
                "sens": {"gradient": {"bert.encoder." + n: rng.uniform(0.1, 1.0) for n in LAYERS}},
                "seconds": {"gradient": rng.uniform(0.1, 1.0)}}]
    for method, li, seed, lr in plan(cfg, "planted"):
        level = cfg.budgets[li]
        ran_at = BEST[(method, level)] if lr is None else lr
        records.append({"kind": "run", "key": run_key(cfg, "planted", method, li, seed, lr),
                        "run": _run(rng, method, level, seed, ran_at)})
    return journal.Records(records)


@pytest.mark.parametrize("seeds", [1, 2])  # one seed: no run at a selected rate, only the grid chooses
@pytest.mark.parametrize("seed", [0, 1])
def test_each_method_and_budget_keeps_the_rate_of_its_own_grid(seeds, seed):
    cfg = CFG.replace(seeds=seeds)
    tr = task_result(cfg, "planted", made_up_journal(cfg, seed))
    assert tr["lr_choice"] == {"uniform": {"1.0": 1e-3, "2.0": 1e-2}, "gradient": {"1.0": 1e-2, "2.0": 1e-3}}
    for (method, level), lr in BEST.items():
        entry = tr["summary"][method][str(level)]
        assert entry["lr"] == lr and entry["seeds"] == list(range(seeds))

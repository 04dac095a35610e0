"""A learning-rate grid run that diverges is recorded and never selected; a run at a selected
rate that diverges, or a grid where every rate diverged, is an error (tiny sizes, CPU).

Divergence is forced deterministically: the optimizer of chosen runs fills its parameters with
NaN after a given step, so the next training loss (or, after the last step, the final scores)
is NaN through the real code path."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from lorambo.experiments import config as presets
from lorambo.experiments import demo_report, journal, train
from lorambo.experiments.runner import run_experiment
from lorambo.experiments.units import GridDivergedError, run_key
from lorambo.optim import AdamW
from json_numbers import numbers  # tests/experiments/json_numbers.py

CFG = presets.tiny(methods=("uniform", "gradient")).replace(tasks=("planted",), budgets=(1.0,), seeds=2,
                                                            lr_grid=(1e-3, 1e-2), lr_search="uniform")
TIMINGS = ("seconds", "train_seconds")


def exploding_adamw(blow):
    """An AdamW whose parameters become NaN after ``blow(lr, index)`` steps (None: never), where
    ``index`` counts the optimizers built so far (one per run, in execution order)."""
    built = []

    class Exploding(AdamW):
        def __init__(self, params, lr, **kwargs):
            super().__init__(params, lr=lr, **kwargs)
            self.blow_after, self.taken = blow(lr, len(built)), 0
            built.append(lr)

        def step(self, closure=None):
            out = super().step(closure)
            self.taken += 1
            if self.taken == self.blow_after:
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            p.fill_(float("nan"))
            return out

    Exploding.built = built
    return Exploding


def _without_timings(result: dict) -> dict:
    tr = result["tasks"]["planted"]
    return {"runs": [{k: v for k, v in r.items() if k not in TIMINGS} for r in tr["runs"]],
            "lr_choice": tr["lr_choice"], "summary": tr["summary"], "diverged": tr["diverged"]}


def _records(path) -> dict:
    records, torn = journal.read(path)
    assert torn == 0
    return {r["key"]: r for r in records if "key" in r}


@pytest.mark.slow
def test_a_diverged_grid_run_is_recorded_never_selected_and_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "AdamW", exploding_adamw(lambda lr, i: 2 if lr == 1e-2 else None))
    printed = []
    result = run_experiment(CFG, out_dir=tmp_path / "first", progress=False, echo=printed.append)
    path = tmp_path / "first" / "runs.jsonl"

    bad = _records(path)[run_key(CFG, "planted", "uniform", 0, 0, 1e-2)]["run"]
    assert bad["diverged"] is True and bad["lr"] == 1e-2
    assert (bad["diverged_step"], bad["diverged_value"], bad["diverged_where"]) == (2, "nan", "training loss")
    assert len(bad["train_loss"]) == 2 and bad["metric"] is None and "ranks" not in bad
    assert any("lr 0.01 diverged (training loss nan at step 2): recorded, never selected" in line
               for line in printed)

    tr = result["tasks"]["planted"]
    assert tr["lr_choice"] == {"uniform": {"1.0": 1e-3}, "gradient": {"1.0": 1e-3}}
    assert {(r["method"], r["seed"]) for r in tr["runs"] if r["lr"] == 1e-3} == {
        ("uniform", 0), ("uniform", 1), ("gradient", 0), ("gradient", 1)}
    assert tr["summary"]["uniform"]["1.0"]["seeds"] == [0, 1] and tr["summary"]["uniform"]["1.0"]["lr"] == 1e-3
    assert tr["diverged"] == [{"method": "uniform", "level": 1.0, "seed": 0, "lr": 1e-2, "diverged_step": 2,
                               "diverged_value": "nan", "diverged_where": "training loss"}]
    written = json.loads((tmp_path / "first" / "results.json").read_text())
    assert all(math.isfinite(x) for x in numbers(written))
    text = (tmp_path / "first" / "results.txt").read_text()
    assert "learning rates chosen on validation (per budget): uniform 0.001 (0.01 diverged), gradient 0.001" in text
    demo = demo_report.compact(result)
    assert demo["lr_diverged"] == [0.01] and len(demo["methods"]["uniform"]["test_loss"]) == 2
    assert "lr 0.001 (chosen on uniform LoRA, seed 0; 0.01 diverged)" in demo_report.table(demo)

    # resume a journal cut short after the diverged grid run: only the missing run trains
    lines = path.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["key"] == run_key(CFG, "planted", "gradient", 0, 1, None)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:-1]))
    guard = exploding_adamw(lambda lr, i: None)
    monkeypatch.setattr(train, "AdamW", guard)
    again = run_experiment(CFG, out_dir=tmp_path / "again", progress=False, echo=lambda *a: None, resume=cut)
    assert guard.built == [1e-3]  # gradient's seed 1; the diverged grid run is not run again
    assert _without_timings(again) == _without_timings(result)


@pytest.mark.slow
def test_a_grid_where_every_rate_diverged_fails_naming_it(tmp_path, monkeypatch):
    cfg = CFG.replace(methods=("uniform",))
    # 1e-3 breaks on its last update (every training loss finite, the final scores NaN)
    monkeypatch.setattr(train, "AdamW", exploding_adamw(lambda lr, i: {1e-3: 5, 1e-2: 2}[lr]))
    with pytest.raises(GridDivergedError, match=r"planted: every learning rate of uniform's grid at budget level 1 "
                                                r"diverged \(lr 0\.001: final val rel_loss nan at step 5; lr 0\.01: "
                                                r"training loss nan at step 2\): no rate can be selected; lower the "
                                                r"grid \(--lrs\)") as info:
        run_experiment(cfg, out_dir=tmp_path, progress=False, echo=lambda *a: None)
    assert "1 run(s) at its selected rate cannot start" in str(info.value)
    records = _records(tmp_path / "runs.jsonl")
    grid = [records[run_key(cfg, "planted", "uniform", 0, 0, lr)]["run"] for lr in cfg.lr_grid]
    assert [r["diverged"] for r in grid] == [True, True] and len(grid[0]["train_loss"]) == 5
    assert run_key(cfg, "planted", "uniform", 0, 1, None) not in records


@pytest.mark.slow
def test_a_run_at_the_selected_rate_that_diverges_raises(tmp_path, monkeypatch):
    cfg = CFG.replace(methods=("uniform",), lr_grid=(1e-3,))
    monkeypatch.setattr(train, "AdamW", exploding_adamw(lambda lr, i: 3 if i == 1 else None))  # seed 1's run
    with pytest.raises(FloatingPointError, match=r"planted: uniform at budget level 1, seed 1, lr 0\.001: training "
                                                 r"loss nan at step 3: the run diverged") as info:
        run_experiment(cfg, out_dir=tmp_path, progress=False, echo=lambda *a: None)
    assert not isinstance(info.value, GridDivergedError)
    records = _records(tmp_path / "runs.jsonl")
    assert records[run_key(cfg, "planted", "uniform", 0, 0, 1e-3)]["run"]["diverged"] is False
    assert run_key(cfg, "planted", "uniform", 0, 1, None) not in records  # a failure is not a record


def _grid_run(lr: float, diverged: bool, loss: float = 0.5) -> dict:
    run = {"task": "planted", "method": "uniform", "level": 1.0, "seed": 0, "lr": lr, "diverged": diverged}
    if diverged:
        return dict(run, diverged_step=3, diverged_value="inf", diverged_where="training loss")
    return dict(run, val={"rel_loss": loss})


def test_selection_skips_diverged_rates_and_names_a_grid_with_none_left():
    from lorambo.experiments.units import best_lr

    assert best_lr([_grid_run(1e-3, False, 0.6), _grid_run(3e-3, False, 0.4), _grid_run(1e-2, True)]) == 3e-3
    with pytest.raises(GridDivergedError, match=r"planted: every learning rate of uniform's grid at budget level 1 "
                                                r"diverged \(lr 0\.001: training loss inf at step 3; lr 0\.01: "):
        best_lr([_grid_run(1e-2, True), _grid_run(1e-3, True)])


def test_the_lr_line_names_the_diverged_rates():
    from lorambo.experiments.results import lr_choice_line

    one = [{"method": "uniform", "level": 0.5, "lr": 1e-2}]
    assert lr_choice_line({"uniform": {"0.5": 3e-3, "1.0": 3e-3}, "eva": {"0.5": 1e-3}}, one) == (
        "learning rates chosen on validation (per budget): uniform 0.003/0.003 (0.01 diverged), eva 0.001")
    several = one + [{"method": "uniform", "level": 1.0, "lr": 1e-2}, {"method": "uniform", "level": 1.0, "lr": 3e-3}]
    assert lr_choice_line({"uniform": {"0.5": 3e-3, "1.0": 1e-3}}, several) == (
        "learning rates chosen on validation (per budget): uniform 0.003/0.001 "
        "(diverged: level 0.5: 0.01; level 1: 0.003, 0.01)")


class FakeExecutor:
    """Records without a model: uniform's grid diverges at every rate, gradient's does not."""

    def __init__(self):
        self.ran = []

    def run(self, unit: dict) -> dict:
        self.ran.append(unit["key"])
        if unit["kind"] == "task":
            return {"kind": "task", "task": unit["task"]}
        if unit["kind"] == "sens":
            return {"kind": "sens", "task": unit["task"], "seed": unit["seed"], "sens": {}, "seconds": {}}
        run = dict(_grid_run(unit["lr"], unit["method"] == "uniform" and not unit["selected"]),
                   method=unit["method"], seed=unit["seed"], seconds=1.0)
        return {"kind": "run", "task": unit["task"], "run": run}


def timed_executor(monkeypatch):
    """A FakeExecutor whose every unit takes one second of the scheduler's clock, so where a time
    limit falls does not depend on the machine; returns (clock, executor)."""
    from lorambo.experiments import scheduler

    clock = [0.0]

    class TimedExecutor(FakeExecutor):
        def run(self, unit: dict) -> dict:
            clock[0] += 1.0
            return super().run(unit)

    monkeypatch.setattr(scheduler, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    return clock, TimedExecutor()


def test_a_fully_diverged_grid_fails_only_after_every_other_unit_ran():
    from lorambo.experiments.scheduler import run_units
    from lorambo.experiments.units import all_units, unit_key

    cfg = CFG.replace(lr_search="first_budget")
    records = journal.Records()
    executor = FakeExecutor()
    with pytest.raises(GridDivergedError, match=r"uniform's grid at budget level 1 diverged .* \(1 run\(s\) at its "
                                                r"selected rate cannot start; the other units that ran are in the "
                                                r"journal\)"):
        run_units(cfg, all_units(cfg), records, lambda rec: records.add(dict(rec, session=0, elapsed=0.0)), 0.0,
                  executor=executor)
    blocked = run_key(cfg, "planted", "uniform", 0, 1, None)
    assert set(executor.ran) == {unit_key(u, cfg) for u in all_units(cfg)} - {blocked}
    assert records.get(run_key(cfg, "planted", "gradient", 0, 1, None))["run"]["lr"] == 1e-3


def test_a_time_limited_call_with_a_fully_diverged_grid_stops_continuably(monkeypatch):
    """The time limit leaves other units pending: the blocked run counts among what is left, a
    warning names the grid, and the call that has nothing else left raises."""
    from lorambo.experiments import scheduler
    from lorambo.experiments.units import all_units, unit_key

    clock, executor = timed_executor(monkeypatch)
    cfg = CFG.replace(lr_search="first_budget")
    records, warnings = journal.Records(), []
    record = lambda rec: records.add(dict(rec, session=0, elapsed=0.0))  # noqa: E731
    left = scheduler.run_units(cfg, all_units(cfg), records, record, 0.0, time_limit=5.5, executor=executor,
                               warn=warnings.append)
    blocked = run_key(cfg, "planted", "uniform", 0, 1, None)
    assert sorted(unit_key(u, cfg) for u in left) == sorted([
        blocked, run_key(cfg, "planted", "gradient", 0, 0, 1e-2), run_key(cfg, "planted", "gradient", 0, 1, None)])
    assert len(warnings) == 1 and "uniform's grid at budget level 1 diverged" in warnings[0]
    assert "1 run(s) at its selected rate cannot start" in warnings[0]
    with pytest.raises(GridDivergedError, match=r"uniform's grid at budget level 1 diverged"):
        scheduler.run_units(cfg, left, records, record, clock[0], time_limit=100.0, executor=executor,
                            warn=warnings.append)
    assert records.get(run_key(cfg, "planted", "gradient", 0, 1, None)) is not None


def test_a_time_limit_no_unit_fits_in_says_so_instead_of_stalling(monkeypatch):
    """Rerunning with a limit shorter than every pending unit's recorded duration started nothing,
    call after call, with the same 'continue with' line; the reason now says to raise the limit."""
    from lorambo.experiments import scheduler
    from lorambo.experiments.units import all_units

    clock, executor = timed_executor(monkeypatch)
    cfg = CFG.replace(lr_search="first_budget")
    records = journal.Records()
    record = lambda rec: records.add(dict(rec, session=0, elapsed=0.0))  # noqa: E731
    left = scheduler.run_units(cfg, all_units(cfg), records, record, 0.0, time_limit=3.5, executor=executor)
    assert left and all(u["kind"] == "run" for u in left)
    again = scheduler.run_units(cfg, left, records, record, clock[0], time_limit=0.5, executor=executor)
    assert len(again) == len(left)  # every pending run is recorded at 1 s: none fits in 0.5 s
    reason = scheduler.none_started_reason(again, records, 0.0, 0.5)
    assert "no unit started within the time limit of 0.5 s" in reason
    assert "shortest pending unit is expected to take 1 s" in reason and "larger --time-limit" in reason
    assert "30 s had passed (setup)" in scheduler.none_started_reason(again, records, 30.0, 20.0)


def test_the_reason_no_unit_started_reads_the_shortest_pending_unit():
    """Units of other kinds and methods take other times: the limit is too short only when even the
    quickest pending one could not fit."""
    from lorambo.experiments import scheduler

    def run(method, seconds):
        return {"kind": "run", "key": method, "task": "planted", "run": {"method": method, "seconds": seconds}}

    records = journal.Records([run("uniform", 2.0), run("alora", 50.0)])
    left = [{"kind": "run", "task": "planted", "method": m} for m in ("alora", "uniform")]
    assert "2 s had passed (setup)" in scheduler.none_started_reason(left, records, 2.0, 10.0)
    assert "the shortest pending unit is expected to take 50 s" in scheduler.none_started_reason(left[:1], records,
                                                                                                  0.0, 10.0)


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_final_score_that_is_not_finite_on_either_split_is_a_divergence(planted_task, tiny_cfg, monkeypatch, split):
    """The last update alone can break the model: a non-finite final validation score (what the
    rate is chosen by) counts as much as a non-finite test score."""
    from lorambo.experiments.methods import RunContext, budget_of

    task = planted_task
    evaluate = type(task).evaluate

    def broken_on(model, which, *args, **kwargs):
        scores = evaluate(task, model, which, *args, **kwargs)
        return {k: float("nan") for k in scores} if which == split else scores

    monkeypatch.setattr(task, "evaluate", broken_on)
    cfg = tiny_cfg.replace(val_every=0)
    batches = task.train_batches(0, cfg.steps, cfg.batch_size)
    ctx = RunContext(task, cfg, 1.0, budget_of(1.0, task.dims), 0, batches[:1], task.heldout_batches(4), {})
    run = train.train_run(ctx, "uniform", 1e-3, batches, record_divergence=True)
    assert (run["diverged"], run["diverged_step"], run["diverged_where"], run["diverged_value"]) == (
        True, cfg.steps, f"final {split} {task.metric}", "nan")
    with pytest.raises(FloatingPointError, match=f"final {split} {task.metric} nan at step {cfg.steps}"):
        train.train_run(ctx, "uniform", 1e-3, batches)

"""The demo's verdict on synthetic numbers: gap closed, its summary, table and committed JSON."""

import importlib.util
import json
import math
import random
import statistics

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments import demo_report
from lorambo.experiments.methods_lorambo import oracle_ranks
from lorambo.experiments.planted import PLANTED_RANKS
from lorambo.experiments.plots import metric_vs_budget
from lorambo.experiments.results import gap_closed, summarize
from lorambo.experiments.runner import plan
from pyplot_state import pyplot_left_alone

MINILM_DIMS = {f"layer.{b}.{t}": ((1536, 384) if t == "intermediate.dense" else
                                  (384, 1536) if t == "output.dense" else (384, 384))
               for b in range(6) for t in ("attention.self.query", "attention.self.key", "attention.self.value",
                                           "attention.output.dense", "intermediate.dense", "output.dense")}


def test_gap_closed_losses_and_accuracies():
    uniform, oracle = {0: 0.50, 1: 0.40, 2: 0.60}, {0: 0.10, 1: 0.20, 2: 0.20}
    got = gap_closed({0: 0.30, 1: 0.45, 2: 0.20}, uniform, oracle)
    assert got == pytest.approx({0: 0.5, 1: -0.25, 2: 1.0})       # half, worse than uniform, all of it
    acc = gap_closed({0: 0.85}, {0: 0.80}, {0: 0.90})              # higher is better: same convention
    assert acc == pytest.approx({0: 0.5})
    assert gap_closed({0: 0.3, 5: 0.1}, {0: 0.5, 1: 0.5}, {0: 0.1, 1: 0.1}) == pytest.approx({0: 0.5})  # paired only
    assert gap_closed({0: 0.3, 1: 0.2}, {0: 0.5, 1: 0.4}, {0: 0.5, 1: 0.0}) == pytest.approx({1: 0.5})  # no gap: left out


def _run(method, seed, loss, ranks):
    return {"method": method, "level": 0.5, "seed": seed, "lr": 3e-3, "metric": loss, "spent": 20736,
            "budget": 20736, "ranks": ranks, "spearman": 0.5, "planted_share": 0.5, "planted_coverage": 0.25,
            "val_curve": [[50, loss + 0.2], [100, loss]]}


def _synthetic():
    losses = {"uniform": [0.50, 0.52, 0.48], "oracle": [0.10, 0.12, 0.08], "probe": [0.30, 0.22, 0.48]}
    ranks = dict.fromkeys(MINILM_DIMS, 0)
    runs = [_run(m, s, v, ranks) for m, vals in losses.items() for s, v in enumerate(vals)]
    lr_choice = {m: {"0.5": 3e-3} for m in losses}
    return runs, lr_choice, losses


def test_summary_pairs_seeds_and_counts_wins():
    runs, lr_choice, losses = _synthetic()
    summary = summarize(runs, lr_choice, list(losses), [0.5], higher_is_better=False)
    probe = summary["probe"]["0.5"]
    assert probe["gap_closed"] == pytest.approx([0.5, 0.75, 0.0])
    assert probe["gap_closed_mean"] == pytest.approx(1.25 / 3)
    assert probe["gap_closed_std"] == pytest.approx(statistics.stdev([0.5, 0.75, 0.0]), rel=1e-12)  # n - 1
    assert probe["wins_vs_uniform"] == 2 and probe["paired_seeds"] == 3     # a tie is not a win
    assert summary["oracle"]["0.5"]["gap_closed"] == pytest.approx([1.0, 1.0, 1.0])
    assert summary["probe"]["0.5"]["val_curve_steps"] == [50, 100]
    assert summary["probe"]["0.5"]["val_curve_mean"] == pytest.approx([1.0 / 3 + 0.2, 1.0 / 3])
    spread = statistics.stdev(losses["probe"])                  # each curve point is the loss plus a constant
    assert summary["probe"]["0.5"]["val_curve_std"] == pytest.approx([spread, spread], rel=1e-12)



def test_summary_reads_only_finite_runs_at_the_chosen_rate():
    """Runs at other grid rates and runs that diverged stay out of the numbers; a single seed has
    standard deviation 0 (not 1); a method given but never run gets no entry, a run without a
    validation curve no curve."""
    ranks = dict.fromkeys(MINILM_DIMS, 0)
    runs = [_run("uniform", 0, 0.50, ranks), dict(_run("probe", 0, 0.30, ranks), val_curve=[]),  # val_every 0
            dict(_run("probe", 0, 0.05, ranks), lr=1e-2),                       # another grid rate
            dict(_run("uniform", 0, 0.01, ranks), diverged=True)]               # diverged: never read
    lr_choice = {"uniform": {"0.5": 3e-3}, "probe": {"0.5": 3e-3}}
    summary = summarize(runs, lr_choice, ["uniform", "probe", "gradient"], [0.5], higher_is_better=False)
    assert set(summary) == {"uniform", "probe"}                                 # gradient never ran
    assert (summary["uniform"]["0.5"]["metric_mean"], summary["uniform"]["0.5"]["metric_std"]) == (0.50, 0.0)
    probe = summary["probe"]["0.5"]
    assert (probe["metric_mean"], probe["metric_std"]) == (0.30, 0.0)
    assert probe["gain_vs_uniform_mean"] == pytest.approx(0.20) and probe["gain_vs_uniform_std"] == 0.0
    assert probe["wins_vs_uniform"] == 1 and probe["paired_seeds"] == 1
    assert "val_curve_steps" not in probe and summary["uniform"]["0.5"]["val_curve_steps"] == [50, 100]
    assert "wins_vs_uniform" not in summary["uniform"]["0.5"]                  # uniform is not compared with itself
    two = summarize([_run("uniform", 0, 0.5, ranks), _run("uniform", 1, 0.7, ranks)], lr_choice, ["uniform"], [0.5],
                    higher_is_better=False)["uniform"]["0.5"]
    assert (two["metric_mean"], two["metric_std"]) == pytest.approx((0.6, math.sqrt(0.02)), rel=1e-12)  # n - 1



def test_summary_of_accuracies_counts_higher_as_better():
    """Paired gains by hand: probe - uniform per seed (0.02, -0.01, 0.0): one win in three."""
    ranks = dict.fromkeys(MINILM_DIMS, 0)
    acc = {"uniform": [0.80, 0.82, 0.78], "probe": [0.82, 0.81, 0.78]}
    runs = [_run(m, s, v, ranks) for m, vals in acc.items() for s, v in enumerate(vals)]
    summary = summarize(runs, {m: {"0.5": 3e-3} for m in acc}, list(acc), [0.5], higher_is_better=True)
    probe = summary["probe"]["0.5"]
    assert probe["gain_vs_uniform_mean"] == pytest.approx(0.01 / 3, abs=1e-12)
    assert probe["gain_vs_uniform_std"] == pytest.approx(statistics.stdev([0.02, -0.01, 0.0]), abs=1e-12)
    assert probe["wins_vs_uniform"] == 1 and probe["paired_seeds"] == 3

def test_the_accuracy_table_of_an_experiment_without_uniform_lora():
    """``--task sentiment --methods gradient,probe --lr-search per_budget`` is a valid experiment:
    every run finished, then writing sentiment_results.json's table raised TypeError on the
    missing uniform rate (``lr`` None), so no result was written at all. The table now says that
    each method ran at its own grid's rate and that there is no uniform run to beat."""
    ranks = dict.fromkeys(MINILM_DIMS, 0)
    acc = {"gradient": [0.81, 0.77], "probe": [0.74, 0.79]}
    rates = {"gradient": 1e-3, "probe": 1e-2}
    runs = [dict(_run(m, s, v, ranks), lr=rates[m]) for m, vals in acc.items() for s, v in enumerate(vals)]
    lr_choice = {m: {"0.5": rates[m]} for m in acc}
    summary = summarize(runs, lr_choice, list(acc), [0.5], higher_is_better=True)
    cfg = presets.sentiment_full().replace(methods=tuple(acc), budgets=(0.5,))
    result = {"config": cfg.as_dict(), "seconds": 3.0,
              "tasks": {"sentiment": {"budgets": {"0.5": 20736}, "lr_choice": lr_choice, "runs": runs,
                                      "summary": summary, "diverged": [],
                                      "describe": {"linear_probe": {"test": 0.7125}, "sizes": {}}}}}
    out = demo_report.accuracy_summary(result)
    assert out["lr"] is None and {m: row["accuracy"] for m, row in out["methods"].items()} == acc
    text = demo_report.accuracy_table(out)
    assert "5 seeds, each method at the rate its own grid chose on seed 0 (column lr); linear probe" in text
    assert "1 seed, each method" in demo_report.accuracy_table(dict(out, seeds=1))  # not "1 seeds"
    assert "test accuracy 0.713" in text
    assert "| closed form, gradient | 0.7900 ± 0.0283 | 0.8100, 0.7700 | n/a | 0.001 |" in text
    assert "| knapsack, probe directions | 0.7650 ± 0.0354 | 0.7400, 0.7900 | n/a | 0.01 |" in text


@pytest.mark.parametrize("search", ["per_budget", "first_budget"])
def test_tables_name_each_methods_own_rate_unless_one_was_chosen_on_uniform(search):
    """With ``--lr-search per_budget`` (or ``first_budget``) every method runs at the rate its own
    grid chose: the headers said "lr <uniform's rate> (chosen on uniform LoRA)" all the same. They
    now say each method ran at its own rate, and a column gives it with that method's diverged rates."""
    runs, lr_choice, losses = _synthetic()
    rates = {"uniform": 1e-3, "oracle": 3e-3, "probe": 1e-2}
    runs = [dict(r, lr=rates[r["method"]]) for r in runs]
    lr_choice = {m: {"0.5": rates[m]} for m in losses}
    diverged = [{"method": "probe", "level": 0.5, "lr": 3e-2}, {"method": "uniform", "level": 1.0, "lr": 1e-1}]
    summary = summarize(runs, lr_choice, list(losses), [0.5], higher_is_better=False)
    cfg = presets.default().replace(methods=tuple(losses), lr_search=search)
    result = {"config": cfg.as_dict(), "seconds": 1.0,
              "tasks": {"planted": {"budgets": {"0.5": 20736}, "lr_choice": lr_choice, "runs": runs,
                                    "summary": summary, "diverged": diverged, "describe": {}}}}
    text = demo_report.table(dict(demo_report.compact(result), budget=20736, planted_params=20736))
    assert "chosen on uniform" not in text and "3 seeds, each method at the rate its own grid chose" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| uniform LoRA"].endswith(" | 0.001 |") and rows["| oracle: planted ranks"].endswith(" | 0.003 |")
    assert rows["| knapsack, probe directions"].endswith(" | 0.01 (0.03 diverged) |")

    acc_result = {"config": cfg.replace(tasks=("sentiment",)).as_dict(), "seconds": 1.0,
                  "tasks": {"sentiment": dict(result["tasks"]["planted"],
                                              describe={"linear_probe": {"test": 0.7}, "sizes": {}})}}
    acc_text = demo_report.accuracy_table(demo_report.accuracy_summary(acc_result, "sentiment"))
    assert "chosen on uniform" not in acc_text and "each method at the rate its own grid chose" in acc_text
    assert [line.rsplit(" | ", 2)[-2:] for line in acc_text.splitlines()[4:]] == [
        ["—", "0.001 |"], ["3/3", "0.003 |"], ["2/3", "0.01 (0.03 diverged) |"]]


def test_the_accuracy_summary_reads_the_first_budget_and_carries_the_run_record():
    """A method without an entry at the first budget (run at another one only) is left out, not
    a TypeError; the machine line and the command come from the result as recorded."""
    ranks = dict.fromkeys(MINILM_DIMS, 0)
    acc = {"uniform": [0.80, 0.78], "probe": [0.83, 0.77]}
    runs = [_run(m, s, v, ranks) for m, vals in acc.items() for s, v in enumerate(vals)]
    lr_choice = {m: {"0.5": 3e-3} for m in acc}
    summary = summarize(runs, lr_choice, list(acc), [0.5], higher_is_better=True)
    summary["alora"] = {"1.0": summary["probe"]["0.5"]}
    cfg = presets.sentiment_full().replace(methods=("uniform", "probe", "alora"), budgets=(0.5, 1.0))
    result = {"config": cfg.as_dict(), "seconds": 3.0, "machine": "box: Linux, 2 CPUs",
              "command": "lorambo experiment --task sentiment",
              "tasks": {"sentiment": {"budgets": {"0.5": 20736, "1.0": 41472}, "lr_choice": lr_choice,
                                      "runs": runs, "summary": summary, "diverged": [],
                                      "describe": {"linear_probe": {"test": 0.7}, "sizes": {}}}}}
    out = demo_report.accuracy_summary(result)
    assert list(out["methods"]) == ["uniform", "probe"] and out["budget"] == 20736
    assert (out["machine"], out["command"]) == ("box: Linux, 2 CPUs", "lorambo experiment --task sentiment")
    assert out["methods"]["probe"]["accuracy"] == acc["probe"]


def test_gap_closed_of_a_method_equal_to_uniform_is_plus_zero():
    """0 / (a negative gap) is -0.0 in floats; the JSON and the tables show 0.0."""
    got = gap_closed({0: 0.5}, {0: 0.5}, {0: 0.1})
    assert got == {0: 0.0} and math.copysign(1.0, got[0]) == 1.0

def test_compact_json_and_table(tmp_path):
    runs, lr_choice, losses = _synthetic()
    summary = summarize(runs, lr_choice, list(losses), [0.5], higher_is_better=False)
    result = {"config": presets.default().replace(methods=("uniform", "oracle", "probe")).as_dict(),
              "machine": "test box, load 0.1", "seconds": 12.5, "command": "lorambo demo",
              "tasks": {"planted": {"budgets": {"0.5": 20736}, "lr_choice": lr_choice, "runs": runs,
                                    "summary": summary,
                                    "describe": {"planted_params": 20736, "planted_ranks": PLANTED_RANKS,
                                                 "sizes": {"train": 1, "val": 1, "test": 1}}}}}
    out = demo_report.compact(result)
    assert (out["machine"], out["command"]) == ("test box, load 0.1", "lorambo demo")
    assert out["wall_s"] == out["cpu_s"] == 12.5                       # no cpu_seconds: the wall time
    assert out["methods"]["probe"]["test_loss"] == losses["probe"]
    assert out["methods"]["probe"]["gap_closed"] == pytest.approx([0.5, 0.75, 0.0])
    assert out["methods"]["probe"]["coverage"] == pytest.approx(0.25)
    json.dumps(out)  # JSON-ready
    text = demo_report.table(out)
    assert "0.42 ± 0.38" in text and "2/3" in text and "| uniform LoRA | 0.500 ± 0.020 |" in text
    if importlib.util.find_spec("matplotlib") is None:  # the GPU image: the plots are drawn elsewhere
        with pytest.raises(ModuleNotFoundError, match="matplotlib"):
            demo_report.demo_plots(out, tmp_path)
        return
    with pyplot_left_alone():  # the drawing switched the caller's backend to Agg
        paths = demo_report.demo_plots(out, tmp_path)
        paths.append(metric_vs_budget({"task": "planted", "metric": "loss", "higher_is_better": False,
                                       "seeds": 3, "summary": summary}, tmp_path / "budget.png"))
    assert [p.name for p in paths] == ["demo_gap_closed.png", "demo_val_loss.png", "demo_rank_heatmaps.png",
                                       "budget.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)



def test_the_gap_plot_draws_one_bar_per_method_with_paired_seeds(tmp_path, monkeypatch):
    """Uniform and the oracle are the plot's 0 and 1 lines, and a method with no paired seed has
    no gap to draw: the bars are the other methods' mean gaps, the dots their seeds."""
    pytest.importorskip("matplotlib")
    from lorambo.experiments.config import METHOD_LABELS

    rng = random.Random(3)
    gaps = {"uniform": [0.0, 0.0], "oracle": [1.0, 1.0], "probe": [rng.uniform(0, 1) for _ in range(2)],
            "gradient": [], "hessian": [rng.uniform(0, 1) for _ in range(2)]}
    summary = {"budget": 20736, "methods": {m: {"gap_closed": g, "gap_closed_mean": statistics.mean(g) if g else None,
                                                "gap_closed_std": statistics.stdev(g) if g else None}
                                            for m, g in gaps.items()}}
    figures = []
    monkeypatch.setattr(demo_report, "atomic_save_figure", lambda fig, path, **kw: figures.append(fig) or path)
    demo_report.gap_plot(summary, tmp_path / "gap.png")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == [METHOD_LABELS["probe"], METHOD_LABELS["hessian"]]
    means = [statistics.mean(gaps[m]) for m in ("probe", "hessian")]
    assert [b.get_height() for b in ax.patches] == pytest.approx(means)
    dots = [list(line.get_ydata()) for line in ax.lines if line.get_marker() == "."]
    assert dots == [gaps["probe"], gaps["hessian"]]


def test_compact_reads_the_runs_at_the_chosen_rate_and_first_budget():
    """The per-seed losses are those of the runs at the chosen rate and the first budget: another
    grid rate, a diverged run and a run at another budget (each recorded after the chosen one, so
    a filter that let it through would replace that seed's loss) stay out, and only uniform's
    diverged rates at that budget are named; a method without a run at that budget has no row."""
    runs, lr_choice, losses = _synthetic()
    runs = [dict(r, lr=1e-3) if r["method"] == "oracle" else r for r in runs]
    ranks = runs[0]["ranks"]
    lr_choice["oracle"]["0.5"], lr_choice["probe"]["1.0"] = 1e-3, 3e-3         # the table's lr is uniform's
    noise = [dict(_run("uniform", 0, 0.9, ranks), lr=1e-2),
             dict(_run("uniform", 1, 0.0, ranks), metric=None, lr=3e-2, diverged=True),
             dict(_run("probe", 2, 0.05, ranks), level=1.0)]
    diverged = [{"method": "uniform", "level": 0.5, "lr": 3e-2}, {"method": "uniform", "level": 1.0, "lr": 1e-1},
                {"method": "probe", "level": 0.5, "lr": 5e-2}, {"method": "oracle", "level": 0.5, "lr": 1e-2}]
    summary = summarize(runs + noise, lr_choice, list(losses), [0.5], higher_is_better=False)
    summary["gradient"] = {"1.0": summary["probe"]["0.5"]}      # ran at another budget only: no row
    result = {"config": presets.default().replace(methods=("uniform", "oracle", "probe")).as_dict(),
              "seconds": 1.0, "tasks": {"planted": {"budgets": {"0.5": 20736}, "lr_choice": lr_choice,
                                                    "runs": runs + noise, "summary": summary, "diverged": diverged,
                                                    "describe": {}}}}
    out = demo_report.compact(result)
    assert {m: row["test_loss"] for m, row in out["methods"].items()} == losses
    assert out["lr"] == 3e-3 and out["lr_diverged"] == [3e-2]
    text = demo_report.table(dict(out, budget=20736, planted_params=20736))
    assert "lr 0.003 (chosen on uniform LoRA, seed 0; 0.03 diverged)" in text

@pytest.mark.parametrize("level, k", [(0.5, 1), (1.0, 2), (2.0, 4), (0.75, 1.5)])
def test_oracle_spends_exactly_p_at_every_budget(level, k):
    from lorambo.experiments.methods import budget_of, spent

    budget = budget_of(level, MINILM_DIMS)
    ranks = oracle_ranks(PLANTED_RANKS, MINILM_DIMS, budget)
    assert ranks == {n: int(k * r) for n, r in PLANTED_RANKS.items()}
    assert spent(ranks, MINILM_DIMS) == budget


def test_oracle_refuses_a_budget_it_cannot_spend_exactly():
    from lorambo.experiments.methods import budget_of

    with pytest.raises(ValueError, match="oracle: budget P = 24,883 is 1.2 x the planted cost"):
        oracle_ranks(PLANTED_RANKS, MINILM_DIMS, budget_of(0.6, MINILM_DIMS))


def test_default_preset_is_the_discriminating_demo():
    cfg = presets.default()
    assert cfg.tasks == ("planted",) and cfg.budgets == (0.5,)          # P = P* on MiniLM
    assert set(cfg.methods) == {"uniform", "oracle", "gradient", "hessian", "online", "alora", "probe"}
    assert (cfg.steps, cfg.batch_size, cfg.max_length, cfg.seeds) == (200, 8, 16, 3)
    assert cfg.lr_grid == (1e-3, 3e-3, 1e-2) and cfg.lr_search == "uniform" and cfg.threads == 1
    assert cfg.train_examples == 0 and cfg.eval_examples == 0              # whole splits


def test_plan_with_the_learning_rate_chosen_on_uniform():
    cfg = presets.ExperimentConfig(methods=("probe", "uniform", "oracle"), budgets=(0.5, 1.0), seeds=2,
                                   lr_grid=(1e-3, 1e-2), lr_search="uniform")
    assert plan(cfg) == [("uniform", 0, 0, 1e-3), ("uniform", 0, 0, 1e-2), ("uniform", 0, 1, None),
                         ("uniform", 1, 0, None), ("uniform", 1, 1, None),
                         ("probe", 0, 0, None), ("probe", 0, 1, None), ("probe", 1, 0, None), ("probe", 1, 1, None),
                         ("oracle", 0, 0, None), ("oracle", 0, 1, None), ("oracle", 1, 0, None),
                         ("oracle", 1, 1, None)]
    with pytest.raises(ValueError, match="lr_search='uniform'.*add 'uniform'"):
        presets.ExperimentConfig(methods=("probe",), lr_search="uniform")



@pytest.mark.parametrize("search, probe_rates", [("uniform", (3e-3, 3e-3)), ("first_budget", (1e-3, 1e-3)),
                                                  ("per_budget", (1e-3, 1e-2))])
def test_a_selected_rate_comes_from_the_grid_the_search_names(search, probe_rates):
    """Seed 0's grids, each with its own best rate (lowest validation loss): uniform's at the first
    budget 3e-3, probe's 1e-3 at the first budget and 1e-2 at the second. A run waits (None) for
    its seed's sensitivities and for every run of its grid."""
    from lorambo.experiments.units import inputs, run_key, selected_lr, unit_key

    cfg = presets.ExperimentConfig(tasks=("planted",), methods=("uniform", "probe"), budgets=(0.5, 1.0), seeds=2,
                                   lr_grid=(1e-3, 3e-3, 1e-2), lr_search=search)
    best = {("uniform", 0): 3e-3, ("uniform", 1): 1e-2, ("probe", 0): 1e-3, ("probe", 1): 1e-2}
    records = {run_key(cfg, "planted", m, li, 0, lr): {"run": {"lr": lr, "val": {"rel_loss": 0.1 if lr == b else 0.5}}}
               for (m, li), b in best.items() for lr in cfg.lr_grid}
    assert tuple(selected_lr(cfg, "planted", "probe", li, records) for li in (0, 1)) == probe_rates
    unit = {"kind": "run", "task": "planted", "method": "probe", "li": 1, "seed": 1, "lr": None}
    assert inputs(unit, cfg, records) is None                                   # no sensitivities yet
    records[unit_key({"kind": "sens", "task": "planted", "seed": 0}, cfg)] = {"sens": {"probe": {}}}
    assert inputs(unit, cfg, records) == dict(unit, lr=probe_rates[1], sens={"probe": {}}, selected=True)
    del records[run_key(cfg, "planted", "uniform", 0, 0, 1e-2)]                 # uniform's grid incomplete
    assert (inputs(unit, cfg, records) is None) == (search == "uniform")

def test_probe_needs_its_training_batches():
    from lorambo.experiments.probe import probe_sensitivity

    cfg = presets.tiny()
    with pytest.raises(ValueError, match="probe: needs 3 training batches, got 2"):
        probe_sensitivity(None, cfg, 0, [{}, {}])


def test_a_classification_summary_has_no_planted_recovery_numbers():
    """Sentiment runs record no ρ, share or coverage (there are no planted ranks): the summary is
    made without them rather than failing on the first run that lacks them."""
    rng = random.Random(12)
    ranks, planted_only = dict.fromkeys(MINILM_DIMS, 0), ("spearman", "planted_share", "planted_coverage")
    runs = [{k: v for k, v in _run(m, s, rng.uniform(0.6, 0.9), ranks).items() if k not in planted_only}
            for m in ("uniform", "probe") for s in range(2)]
    summary = summarize(runs, {m: {"0.5": 3e-3} for m in ("uniform", "probe")}, ["uniform", "probe"], [0.5],
                        higher_is_better=True)
    probe = summary["probe"]["0.5"]
    assert probe["metric_mean"] == pytest.approx(statistics.fmean(r["metric"] for r in runs[2:]), rel=1e-12)
    assert not any(k.startswith(planted_only) for k in probe)

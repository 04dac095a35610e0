"""results.txt's verdicts and per-task table on made-up run records: which method beat uniform on
every seed at which budget, and the table's cells (mean ± std, ρ, share, n/a, baselines) in
aligned columns, each value recomputed here by hand."""

import random
import statistics

import pytest

from lorambo.experiments.config import METHOD_LABELS, TASK_LABELS
from lorambo.experiments.results import format_table, summarize, verdicts

RANKS = {"layer.0.attention.self.query": 2}


def _summary(metrics, higher_is_better, rhos=None):
    """``summarize`` of ``{(method, level): [metric per seed]}`` at one rate; ``rhos`` the ρ per method."""
    rhos = rhos or {}
    runs = [{"method": m, "level": lv, "seed": s, "lr": 1e-3, "metric": v, "spent": 10, "budget": int(lv * 1000),
             "ranks": RANKS, "spearman": rhos.get(m, 0.0), "planted_share": 1.0 - rhos.get(m, 0.0),
             "planted_coverage": 0.5} for (m, lv), vals in metrics.items() for s, v in enumerate(vals)]
    methods = list(dict.fromkeys(m for m, _ in metrics))
    levels = sorted({lv for _, lv in metrics})
    lr_choice = {m: {str(lv): 1e-3 for lv in levels} for m in methods}
    return summarize(runs, lr_choice, methods, levels, higher_is_better)


def _label_stats(vals):
    return f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f}"


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_verdicts_name_who_beat_uniform_on_every_seed_at_each_budget(higher_is_better):
    """At 0.5 probe beats uniform on all three seeds and gradient on two (a tie on the third is no
    win); the oracle is the reference, not a verdict. At 1.0 uniform did not run."""
    rng = random.Random(4)
    uniform = [rng.uniform(0.4, 0.6) for _ in range(3)]
    step = 0.1 if higher_is_better else -0.1                  # a move to the better side
    probe = [u + step * rng.uniform(0.2, 1.0) for u in uniform]
    gradient = [uniform[0] + step, uniform[1] + step, uniform[2]]     # better, better, tie: 2 of 3
    metrics = {("uniform", 0.5): uniform, ("oracle", 0.5): [u + step for u in uniform], ("probe", 0.5): probe,
               ("gradient", 0.5): gradient, ("probe", 1.0): probe}
    lines = verdicts("planted", _summary(metrics, higher_is_better), [0.5, 1.0], higher_is_better)
    word = "higher" if higher_is_better else "lower"
    assert lines == [
        f"[planted] level 0.5 (P = 500), uniform {_label_stats(uniform)} ({word} is better):",
        f"  beat uniform on every seed: {METHOD_LABELS['probe']} {_label_stats(probe)} (3/3 seeds)",
        f"  did not: {METHOD_LABELS['gradient']} {_label_stats(gradient)} (2/3 seeds)",
        "[planted] level 1: uniform was not run, no comparison"]


@pytest.mark.parametrize("shift, wins", [(0.1, 0), (-0.1, 2)])
def test_verdicts_say_none_where_no_method_is_on_one_side(shift, wins):
    """Probe's loss is higher (worse) or lower (better) than uniform's on both seeds."""
    rng = random.Random(8)
    uniform = [rng.uniform(0.4, 0.6) for _ in range(2)]
    probe = [u + shift for u in uniform]
    lines = verdicts("planted", _summary({("uniform", 0.5): uniform, ("probe", 0.5): probe}, False), [0.5], False)
    said = f"{METHOD_LABELS['probe']} {_label_stats(probe)} ({wins}/2 seeds)"
    assert lines[1:] == [f"  beat uniform on every seed: {said if wins else 'none'}",
                         f"  did not: {'none' if wins else said}"]


def _cells(line):
    return [c.strip() for c in line.split("|")]


@pytest.mark.parametrize("task", ["planted", "sentiment"])
def test_the_task_table_holds_mean_std_rho_share_and_n_a_in_aligned_columns(task):
    """A row per method and a column group per budget; gradient ran at the second budget only."""
    rng = random.Random(6)
    planted = task == "planted"
    metrics = {(m, lv): [rng.uniform(0.2, 0.9) for _ in range(3)]
               for m in ("uniform", "probe") for lv in (0.5, 1.0)}
    metrics["gradient", 1.0] = [rng.uniform(0.2, 0.9) for _ in range(3)]   # n/a in the first group
    rhos = {"uniform": rng.uniform(-0.5, 0.5), "probe": rng.uniform(0.5, 1.0), "gradient": rng.uniform(-1, 0)}
    summary = _summary(metrics, not planted, rhos)
    baseline = rng.uniform(0.9, 1.0)
    tr = {"task": task, "summary": summary, "metric": "rel_loss" if planted else "accuracy",
          "budgets": {"0.5": 500, "1.0": 1000}, "baselines": {"pretrained": baseline}}
    methods = ["uniform", "gradient", "probe"]
    lines = format_table(tr, methods, [0.5, 1.0]).splitlines()
    assert lines[0] == f"{TASK_LABELS[task]}: held-out {tr['metric']} (mean ± std over seeds)"
    assert _cells(lines[1])[1:] == ["level 0.5, P=500", "level 1, P=1,000"]
    cols = ["loss ρ share"] if planted else ["accuracy"]
    assert [" ".join(c.split()) for c in _cells(lines[2])] == ["method"] + cols * 2
    assert set(lines[3]) == {"-"} and len(lines[3]) == len(lines[2])
    assert _cells(lines[4]) == ["pretrained", f"{baseline:.3f}", f"{baseline:.3f}"]
    for method, line in zip(methods, lines[5:8]):
        cells = _cells(line)
        assert cells[0] == METHOD_LABELS[method]
        for lv, cell in zip((0.5, 1.0), cells[1:]):
            vals = metrics.get((method, lv))
            if vals is None:
                assert cell == "n/a"
                continue
            want = [f"{statistics.fmean(vals):.3f}±{statistics.stdev(vals):.3f}"]
            if planted:
                want += [f"{rhos[method]:.2f}", f"{1.0 - rhos[method]:.2f}"]
            assert cell.split() == want
    bars = {tuple(i for i, ch in enumerate(line) if ch == "|") for line in lines[1:3] + lines[4:8]}
    assert len(bars) == 1                                           # every column starts where its header does
    assert lines[8:] == ([lines[8]] if planted else [])
    assert not planted or lines[8].startswith("ρ: Spearman correlation")

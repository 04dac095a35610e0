"""The demo's and the sentiment task's tables and summaries on small made-up run records, each
number recomputed here by hand (statistics in float64): the spread over one or two seeds, the
first of several budgets, a gap with nothing to close, and tables whose rows fit their header."""

import random
import statistics

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments import demo_report
from lorambo.experiments.results import summarize

RANKS = {"layer.0.attention.self.query": 2, "layer.0.output.dense": 0}
PLANTED = {"layer.0.attention.self.query": 2}


def _run(method, seed, level, metric, lr=3e-3):
    return {"method": method, "level": level, "seed": seed, "lr": lr, "metric": metric, "spent": 100,
            "budget": 100, "ranks": RANKS, "spearman": 0.5, "planted_share": 0.5, "planted_coverage": 0.25,
            "val_curve": []}


def _result(losses, levels=(0.5,), search="uniform", task="planted", rates=None):
    """A finished experiment from ``{(method, level): [metric per seed]}``, summarized by the library."""
    rates = rates or {}
    runs = [_run(m, s, lv, v, rates.get(m, 3e-3)) for (m, lv), vals in losses.items() for s, v in enumerate(vals)]
    methods = list(dict.fromkeys(m for m, _ in losses))
    lr_choice = {m: {str(lv): rates.get(m, 3e-3) for lv in levels} for m in methods}
    summary = summarize(runs, lr_choice, methods, list(levels), higher_is_better=task != "planted")
    seeds = max(len(v) for v in losses.values())
    cfg = presets.default().replace(tasks=(task,), methods=tuple(methods), budgets=tuple(levels), seeds=seeds,
                                    lr_search=search)
    budgets = {str(lv): int(lv * 200) for lv in levels}
    describe = {"planted_params": 100, "planted_ranks": PLANTED, "sizes": {}, "linear_probe": {"test": 0.7}}
    return {"config": cfg.as_dict(), "seconds": 1.0,
            "tasks": {task: {"budgets": budgets, "lr_choice": lr_choice, "runs": runs, "summary": summary,
                             "diverged": [], "describe": describe}}}


def _rows(text):
    return {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}


@pytest.mark.parametrize("seeds", [1, 2])
def test_the_test_loss_spread_over_one_or_two_seeds(seeds):
    """One seed has no spread (0.000, not nan); two seeds the sample standard deviation |a - b| / sqrt(2)."""
    rng = random.Random(seeds)
    losses = {(m, 0.5): [rng.uniform(lo, lo + 0.1) for _ in range(seeds)]
              for m, lo in (("uniform", 0.5), ("oracle", 0.1), ("probe", 0.3))}
    text = demo_report.table(demo_report.compact(_result(losses)))
    for (method, _), vals in losses.items():
        std = abs(vals[0] - vals[1]) / 2 ** 0.5 if seeds == 2 else 0.0
        label = presets.METHOD_LABELS[method]
        assert _rows(text)[label].startswith(f"| {label} | {statistics.fmean(vals):.3f} ± {std:.3f} |")


def test_compact_reads_the_first_of_several_budgets():
    """Runs at the second budget score differently; none of them may enter the demo's numbers."""
    rng = random.Random(7)
    losses = {(m, lv): [rng.uniform(0.1, 0.9) for _ in range(3)]
              for m in ("uniform", "oracle", "probe") for lv in (0.5, 1.0)}
    out = demo_report.compact(_result(losses, levels=(0.5, 1.0)))
    assert out["budget"] == 100
    assert {m: row["test_loss"] for m, row in out["methods"].items()} == {m: losses[m, 0.5] for m in
                                                                            ("uniform", "oracle", "probe")}
    u, o, p = (losses[m, 0.5] for m in ("uniform", "oracle", "probe"))
    shares = [(a - b) / (a - c) for a, b, c in zip(u, p, o)]          # (uniform - method) / (uniform - oracle)
    assert out["methods"]["probe"]["gap_closed"] == pytest.approx(shares, rel=1e-12)
    assert out["methods"]["probe"]["wins_vs_uniform"] == sum(b < a for a, b in zip(u, p))


def test_one_rate_chosen_on_uniform_is_not_repeated_as_each_methods_own():
    """With ``lr_search="uniform"`` the summaries give the one rate at the top, and no method row
    claims a rate of its own (the per-method rate belongs to the other searches)."""
    rng = random.Random(11)
    losses = {(m, 0.5): [rng.uniform(0.1, 0.9) for _ in range(2)] for m in ("uniform", "oracle", "probe")}
    out = demo_report.compact(_result(losses))
    assert out["lr"] == 3e-3 and all("lr" not in row for row in out["methods"].values())
    acc = demo_report.accuracy_summary(_result(losses, task="sentiment"), "sentiment")
    assert acc["lr"] == 3e-3 and all("lr" not in row for row in acc["methods"].values())


def test_a_method_with_no_gap_to_close_reads_n_a():
    """Uniform equal to the oracle on every seed leaves 0 / 0 on each: no share, the table says n/a."""
    rng = random.Random(5)
    same = [rng.uniform(0.3, 0.6) for _ in range(2)]
    losses = {("uniform", 0.5): same, ("oracle", 0.5): list(same), ("probe", 0.5): [v - 0.1 for v in same]}
    text = demo_report.table(demo_report.compact(_result(losses)))
    assert " | n/a | 2/2 | " in _rows(text)[presets.METHOD_LABELS["probe"]]  # better than uniform on both


@pytest.mark.parametrize("search", ["uniform", "per_budget"])
def test_every_table_row_has_the_headers_cells(search):
    """A Markdown table renders only when each row has as many cells as the header and the
    separator (the lr column included), and the note under it needs a blank line to leave it."""
    rng = random.Random(3)
    rates = {"uniform": 1e-3, "oracle": 3e-3, "probe": 1e-2} if search != "uniform" else None
    losses = {(m, 0.5): [rng.uniform(0.1, 0.9) for _ in range(2)] for m in ("uniform", "oracle", "probe")}
    planted = demo_report.table(demo_report.compact(_result(losses, search=search, rates=rates)))
    sentiment = demo_report.accuracy_table(demo_report.accuracy_summary(
        _result(losses, search=search, rates=rates, task="sentiment"), "sentiment"))
    for text, columns in ((planted, 7), (sentiment, 4)):
        lines = text.splitlines()
        table = [line for line in lines if line.startswith("|")]
        assert len(table) == 2 + 3                                    # header, separator, a row per method
        columns += search != "uniform"
        assert [line.count("|") for line in table] == [columns + 1] * len(table)
        assert lines[lines.index(table[-1]) + 1:][:1] in ([], [""])  # the table ends at a blank line or the text
    assert planted.splitlines()[-2] == "" and planted.splitlines()[-1].startswith("gap closed:")

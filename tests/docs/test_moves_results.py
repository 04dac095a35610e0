"""docs/demo.md's tables of rank moves on the planted task are the committed runs
(docs/moves_results.json at 200 steps, docs/moves_results_800_steps.json at 800; scored by the
loss a removal costs, docs/moves_removal_results*.json and the variants that lost; rendered by
``lorambo.experiments.demo_report``), and the README's numbers for them are those runs'."""

import json
from pathlib import Path

import numpy as np
import pytest

from lorambo.experiments import demo_report

ROOT = Path(__file__).resolve().parents[2]
RUNS = {name: json.loads((ROOT / "docs" / name).read_text(encoding="utf-8"))
        for name in ("moves_results.json", "moves_results_800_steps.json")}
DOC = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8").replace("\n  ", " ")


def _loss(results, method):
    values = np.array(results["methods"][method]["test_loss"])
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


@pytest.mark.parametrize("name", RUNS)
def test_the_moves_table_in_docs_is_the_committed_run(name):
    rows = [line for line in demo_report.table(RUNS[name]).splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 4 and all(row in DOC.splitlines() for row in rows)


@pytest.mark.parametrize("name", RUNS)
def test_the_docs_name_the_command_and_time_of_the_committed_run(name):
    doc = DOC.replace("\n", " ")
    results = RUNS[name]
    args = results["command"].split(" --workers")[0]  # where it wrote and how it showed progress aside
    assert f"`{args}`" in doc and f"{results['wall_s']:.0f} s beside other jobs" in doc
    assert f"{results['steps']} steps" in demo_report.table(results)


def test_the_readme_quotes_the_moves_runs():
    short, long = RUNS["moves_results.json"], RUNS["moves_results_800_steps.json"]
    assert f"({_loss(short, 'moves')} against uniform's {_loss(short, 'uniform')};" in README
    assert f"({_loss(long, 'moves')} against uniform's {_loss(long, 'uniform')})" in README
    gap = np.mean(long["methods"]["moves"]["gap_closed"])
    share = long["methods"]["moves"]["planted_share"]
    assert f"close only {gap:.2f} of the gap" in README and f"put only {share:.0%} of the budget" in README


def test_the_800_step_paragraph_quotes_its_run():
    long, short = RUNS["moves_results_800_steps.json"], RUNS["moves_results.json"]
    moves, uniform = (np.mean(long["methods"][m]["test_loss"]) for m in ("moves", "uniform"))
    oracle_short, oracle_long = (np.mean(r["methods"]["oracle"]["test_loss"]) for r in (short, long))
    wins = long["methods"]["moves"]["wins_vs_uniform"]
    paragraph = DOC.split("**With four times the steps.**")[1].split("## ")[0].replace("\n", " ")
    assert wins == long["methods"]["moves"]["paired_seeds"] == 3  # "on every seed"
    assert f"({moves:.3f} against uniform's {uniform:.3f})" in paragraph
    assert f"close only {np.mean(long['methods']['moves']['gap_closed']):.2f} of the gap" in paragraph
    assert f"puts {long['methods']['moves']['planted_share']:.0%} of the budget" in paragraph
    assert long["methods"]["moves"]["planted_share"] == pytest.approx(short["methods"]["moves"]["planted_share"])
    assert f"goes on from {oracle_short:.3f} to {oracle_long:.3f}" in paragraph


def test_the_800_step_paragraph_counts_the_moves_from_the_ranks():
    """16 ranks moved on average: the moves method starts from uniform's ranks, so the ranks its
    layers gained over uniform's are the moves made (one rank each)."""
    paragraph = DOC.split("**With four times the steps.**")[1].split("## ")[0].replace("\n", " ")
    for results in RUNS.values():
        uniform, moves = (results["methods"][m]["mean_ranks"] for m in ("uniform", "moves"))
        gained = sum(max(0.0, moves[name] - uniform[name]) for name in uniform)
        assert f"after its {gained:.0f} moves (a mean over seeds, as at 200 steps;" in paragraph


def test_the_800_step_paragraph_names_where_the_ranks_went():
    """The value projections of layers 1-4 end at rank 5 and two planted MLP layers at the rank 0
    uniform gives them, on every seed (a mean of exactly 5 and 0), in both runs."""
    paragraph = DOC.split("**With four times the steps.**")[1].split("## ")[0].replace("\n", " ")
    for results in RUNS.values():
        ranks, planted = results["methods"]["moves"]["mean_ranks"], results["planted_ranks"]
        raised = sorted(name for name, r in ranks.items() if r > 1)
        assert raised == [f"layer.{i}.attention.self.value" for i in range(1, 5)]
        assert {ranks[name] for name in raised} == {5.0}
        assert [name for name in raised if name in planted] == ["layer.1.attention.self.value"]
        uniform = results["methods"]["uniform"]["mean_ranks"]
        left_out = sorted(name for name in planted if ranks[name] == 0)
        assert left_out == ["layer.2.intermediate.dense", "layer.4.output.dense"]
        assert all(uniform[name] == 0 for name in left_out)
    assert "value projections of layers 1-4 to rank 5 (only layer 1's is planted)" in paragraph
    assert ("`layer.2.intermediate.dense` and `layer.4.output.dense`, at the rank 0 that uniform gives them"
            in paragraph)


REMOVAL = {name: json.loads((ROOT / "docs" / name).read_text(encoding="utf-8"))
           for name in ("moves_removal_results.json", "moves_removal_results_800_steps.json")}
VARIANTS = json.loads((ROOT / "docs" / "moves_removal_variants_200_steps.json").read_text(encoding="utf-8"))
REMOVAL_PARAGRAPH = DOC.split("**Scored by what a removal costs.**")[1].split("## ")[0].replace("\n", " ")


@pytest.mark.parametrize("name", REMOVAL)
def test_the_removal_scored_tables_are_the_committed_runs(name):
    results = REMOVAL[name]
    rows = [line for line in demo_report.table(results).splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 4 and all(row in DOC.splitlines() for row in rows)
    assert f"({results['wall_s']:.0f} s," in REMOVAL_PARAGRAPH
    assert f"`{results['command'].replace(' --steps 800', '')}`" in REMOVAL_PARAGRAPH
    assert f"{results['steps']} steps" in demo_report.table(results)


def test_the_removal_paragraph_and_readme_quote_the_runs():
    long, earlier = REMOVAL["moves_removal_results_800_steps.json"], RUNS["moves_results_800_steps.json"]
    row = long["methods"]["moves_ablation"]
    assert row["wins_vs_uniform"] == row["paired_seeds"] == 3  # "on every seed"
    assert REMOVAL["moves_removal_results.json"]["methods"]["moves_ablation"]["wins_vs_uniform"] == 2
    moves, uniform = np.mean(row["test_loss"]), np.mean(long["methods"]["uniform"]["test_loss"])
    gap, online = np.mean(row["gap_closed"]), np.mean(earlier["methods"]["online"]["gap_closed"])
    assert f"on every seed ({moves:.3f} against {uniform:.3f}) and close {gap:.2f}" in REMOVAL_PARAGRAPH
    assert f"more than online growth's {online:.2f}" in REMOVAL_PARAGRAPH
    assert f"({max(row['test_loss']):.3f})" in REMOVAL_PARAGRAPH  # the seed that did not move it
    # two seeds of three gave the planted layer.2.intermediate.dense one rank
    assert row["mean_ranks"]["layer.2.intermediate.dense"] == pytest.approx(2 / 3)
    assert f"± {np.std(row['test_loss'], ddof=1):.3f})" in REMOVAL_PARAGRAPH
    gap_std = np.std(row["gap_closed"], ddof=1)
    quoted = f"they close {gap:.2f} ± {gap_std:.2f} of it ({_loss(long, 'moves_ablation')}, better on every seed)"
    assert quoted in README


def test_the_variants_that_lost_are_the_committed_runs():
    full = VARIANTS["full_ablation_score"]["methods"]
    assert all(f > u for f, u in zip(full["moves_ablation"]["test_loss"], full["uniform"]["test_loss"]))
    assert f"uniform on every seed at 200 steps ({_loss(VARIANTS['full_ablation_score'], 'moves_ablation')})" \
        in REMOVAL_PARAGRAPH
    one = VARIANTS["one_component_per_rank"]
    assert f"gave {_loss(one, 'moves_ablation')} at 200 steps" in REMOVAL_PARAGRAPH
    # the uniform runs are the same as the committed table's, so the variants compare with it
    assert full["uniform"]["test_loss"] == REMOVAL["moves_removal_results.json"]["methods"]["uniform"]["test_loss"]

"""The demo's and the sentiment task's summaries (``demo_results.json``, ``sentiment_results.json``
and their tables in ``results.txt``), written by a whole ``run_experiment`` at a tiny size and
checked against numbers recomputed here from the journal's run records.

The runs train for real (allocation, LoRA, optimizer steps); only the scoring of the validation
and test splits is replaced by drawn numbers, which keeps each run fast and makes every seed,
method and budget score differently, so a summary that reads a wrong run shows."""

import json
import statistics

import pytest
import torch

from lorambo.experiments import config as presets
from lorambo.experiments import journal
from lorambo.experiments.runner import run_experiment
from lorambo.experiments.tasks import PlantedTask, SentimentTask

pytestmark = pytest.mark.slow  # the real MiniLM and both tiny tasks (shared with the other experiment tests)

LEVELS = (0.5, 1.0)  # the summaries read the first budget only: the second one's runs must not leak in
TASK_DATA = ("max_length", "train_examples", "eval_examples", "planted_text", "planted_scale")  # what a task reads


@pytest.fixture(scope="module")
def finished(tmp_path_factory, minilm, planted_task, sentiment_task, tiny_cfg):
    """Both tasks, uniform LoRA (a grid of two rates), the closed-form gradient allocation and the
    oracle, two seeds, two budgets: (config, out folder, echoed text, journal run records). Every
    split is scored as a fresh draw from a generator of its own (the units reseed torch's):
    rel_loss in [0.05, 1.05) on the planted task, accuracy in [0.5, 1) and loss in [0.2, 1.2) on
    the sentiment task. The tasks are the session's (conftest.py), built from the same data settings."""
    draws = torch.Generator().manual_seed(20261207)

    def planted(self, model, split, chunk=256):
        return {"rel_loss": 0.05 + torch.rand((), generator=draws).item()}

    def sentiment(self, model, split, chunk=256):
        return {"accuracy": 0.5 + 0.5 * torch.rand((), generator=draws).item(),
                "loss": 0.2 + torch.rand((), generator=draws).item()}

    cfg = presets.tiny(methods=("uniform", "gradient", "oracle")).replace(
        budgets=LEVELS, seeds=2, lr_grid=(1e-3, 1e-2), lr_search="uniform")
    out, said = tmp_path_factory.mktemp("summaries"), []

    def make_task(name, bert, tokenizer, cfg):
        assert {k: getattr(cfg, k) for k in TASK_DATA} == {k: getattr(tiny_cfg, k) for k in TASK_DATA}
        return {"planted": planted_task, "sentiment": sentiment_task}[name]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lorambo.experiments.minilm.load_minilm", lambda *args, **kwargs: minilm)
        patch.setattr("lorambo.experiments.tasks.make_task", make_task)
        patch.setattr(PlantedTask, "evaluate", planted)
        patch.setattr(SentimentTask, "evaluate", sentiment)
        run_experiment(cfg, out_dir=out, progress=False, echo=said.append)
    records = journal.read(out / journal.FILE_NAME)[0]
    return cfg, out, said[-1], records


def _task_record(records, task):
    return next(r for r in records if r["kind"] == "task" and r["task"] == task)


def _uniform_choice(runs):
    """The rate of uniform LoRA's seed-0 grid at the first budget with the lowest validation loss."""
    grid = [r for r in runs if r["method"] == "uniform" and r["level"] == LEVELS[0] and r["seed"] == 0]
    assert len(grid) == 2
    return min(grid, key=lambda r: (r["val"].get("loss", r["val"].get("rel_loss")), r["lr"]))["lr"]


def _chosen(records, task):
    """{method: [run of seed 0, run of seed 1]} at the first budget and the chosen rate, and the rate."""
    runs = [r["run"] for r in records if r["kind"] == "run" and r["task"] == task]
    lr = _uniform_choice(runs)
    by_method = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        if r["level"] == LEVELS[0] and r["lr"] == lr:
            by_method.setdefault(r["method"], []).append(r)
    assert all([r["seed"] for r in rows] == [0, 1] for rows in by_method.values())
    return by_method, lr


def _mean_std(values):
    return statistics.fmean(values), statistics.stdev(values)


def test_the_demo_summary_holds_the_first_budgets_runs_at_uniforms_rate(finished):
    cfg, out, echoed, records = finished
    demo = json.loads((out / "demo_results.json").read_text())
    task = _task_record(records, "planted")
    chosen, lr = _chosen(records, "planted")
    assert set(demo["methods"]) == set(chosen) == {"uniform", "gradient", "oracle"}
    assert (demo["task"], demo["lr"], demo["budget"], demo["seeds"], demo["steps"]) == (
        "planted", lr, task["budgets"]["0.5"], 2, cfg.steps)
    assert demo["planted_params"] == task["describe"]["planted_params"] == task["budgets"]["0.5"]
    assert demo["planted_ranks"] == task["describe"]["planted_ranks"]
    assert demo["split_sizes"] == task["describe"]["sizes"] and demo["lr_diverged"] == []

    uniform = [r["metric"] for r in chosen["uniform"]]
    oracle = [r["metric"] for r in chosen["oracle"]]
    assert len({r["metric"] for rows in chosen.values() for r in rows}) == 6   # a wrong run would show
    for method, rows in chosen.items():
        got = demo["methods"][method]
        losses = [r["metric"] for r in rows]
        assert got["test_loss"] == losses
        shares = [(m - u) / (o - u) for m, u, o in zip(losses, uniform, oracle)]
        assert got["gap_closed"] == pytest.approx(shares, rel=1e-12)   # uniform 0 and the oracle 1 by definition
        if method == "uniform":
            assert got["wins_vs_uniform"] is None and got["paired_seeds"] is None
        else:
            assert (got["gap_closed_mean"], got["gap_closed_std"]) == pytest.approx(_mean_std(shares), rel=1e-12)
            assert (got["wins_vs_uniform"], got["paired_seeds"]) == (sum(m < u for m, u in zip(losses, uniform)), 2)
        for key, field in (("coverage", "planted_coverage"), ("planted_share", "planted_share"),
                           ("spearman", "spearman"), ("spent", "spent")):
            assert got[key] == pytest.approx(statistics.fmean(r[field] for r in rows), rel=1e-12), key
        assert got["mean_ranks"] == {n: statistics.fmean(r["ranks"][n] for r in rows) for n in rows[0]["ranks"]}
        assert got["val_curve_steps"] == [2, 4, cfg.steps] == [s for s, _ in rows[0]["val_curve"]]
        curve = [_mean_std([r["val_curve"][i][1] for r in rows]) for i in range(3)]
        assert got["val_curve_mean"] == pytest.approx([m for m, _ in curve], rel=1e-12)
        assert got["val_curve_std"] == pytest.approx([s for _, s in curve], rel=1e-12)
        mean, std = _mean_std(losses)
        assert f"| {got['label']} | {mean:.3f} ± {std:.3f} |" in echoed
    assert demo["methods"]["uniform"]["gap_closed"] == [0.0, 0.0]
    assert demo["methods"]["oracle"]["gap_closed"] == [1.0, 1.0]
    gradient = demo["methods"]["gradient"]
    assert (f" | {gradient['gap_closed_mean']:.2f} ± {gradient['gap_closed_std']:.2f} | "
            f"{gradient['wins_vs_uniform']}/2 |") in echoed
    assert f"planted task at P = {task['budgets']['0.5']:,} (P* = {task['budgets']['0.5']:,})" in echoed
    assert f"seeds, lr {lr:g} (chosen on uniform LoRA, seed 0)" in echoed     # no rate diverged


def test_the_sentiment_summary_holds_the_first_budgets_accuracies_at_uniforms_rate(finished):
    cfg, out, echoed, records = finished
    sent = json.loads((out / "sentiment_results.json").read_text())
    task = _task_record(records, "sentiment")
    chosen, lr = _chosen(records, "sentiment")
    assert set(sent["methods"]) == set(chosen) == {"uniform", "gradient"}  # no oracle without planted ranks
    assert (sent["task"], sent["lr"], sent["budget"], sent["seeds"], sent["steps"]) == (
        "sentiment", lr, task["budgets"]["0.5"], 2, cfg.steps)
    for key in ("class_counts", "linear_probe", "dataset"):
        assert sent[key] == task["describe"][key], key
    assert sent["split_sizes"] == task["describe"]["sizes"]
    uniform = [r["metric"] for r in chosen["uniform"]]
    assert len({r["metric"] for rows in chosen.values() for r in rows}) == 4
    for method, rows in chosen.items():
        got = sent["methods"][method]
        accuracies = [r["metric"] for r in rows]
        assert got["accuracy"] == accuracies
        assert (got["mean"], got["std"]) == pytest.approx(_mean_std(accuracies), rel=1e-12)
        assert got["mean_ranks"] == {n: statistics.fmean(r["ranks"][n] for r in rows) for n in rows[0]["ranks"]}
        better = sum(a > u for a, u in zip(accuracies, uniform))
        if method != "uniform":
            assert (got["wins_vs_uniform"], got["paired_seeds"]) == (better, 2)
        wins = "—" if method == "uniform" else f"{better}/2"
        row = (f"| {got['label']} | {got['mean']:.4f} ± {got['std']:.4f} | "
               f"{accuracies[0]:.4f}, {accuracies[1]:.4f} | {wins} |")
        assert row in echoed
    probe = task["describe"]["linear_probe"]["test"]
    assert f"sentiment task at P = {task['budgets']['0.5']:,}" in echoed and f"test accuracy {probe:.3f}" in echoed
    assert f"seeds, lr {lr:g} (chosen on uniform LoRA, seed 0); linear probe" in echoed


def test_results_txt_is_the_echoed_text_and_every_summary_is_written_once(finished):
    cfg, out, echoed, records = finished
    assert (out / "results.txt").read_text() == echoed + "\n"
    result = json.loads((out / "results.json").read_text())
    for name in ("demo_results.json", "sentiment_results.json"):
        summary = json.loads((out / name).read_text())
        assert (summary["wall_s"], summary["cpu_s"]) == (result["seconds"], result["cpu_seconds"])
        assert summary["machine"] == result["machine"] and summary["command"] == result["command"]
    assert echoed.count("| method | test loss (mean ± std) |") == 1
    assert echoed.count("| method | test accuracy (mean ± std) |") == 1

"""A tiny run of the whole experiment (1 seed, a few steps, both tasks) and its artefacts."""

import importlib.util
import json
import math

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments.runner import run_experiment
from json_numbers import numbers  # tests/experiments/json_numbers.py

pytestmark = pytest.mark.slow


def test_tiny_experiment_writes_table_json_and_plots(tmp_path, capsys):
    cfg = presets.tiny(methods=("uniform", "gradient", "oracle")).replace(
        budgets=(0.5, 1.0), lr_search="uniform", lr_grid=(1e-3, 1e-2))
    result = run_experiment(cfg, out_dir=tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "uniform LoRA" in out and "closed form, gradient" in out and "beat uniform" in out
    assert "gap closed" in out and "| oracle: planted ranks |" in out

    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["tasks"]) == {"planted", "sentiment"}
    assert all(math.isfinite(x) for x in numbers(data))
    planted, sentiment = data["tasks"]["planted"], data["tasks"]["sentiment"]
    assert len(planted["runs"]) == 1 + 3 * 2   # uniform's second lr + 3 methods x 2 budgets x 1 seed
    assert len(sentiment["runs"]) == 1 + 2 * 2  # no oracle without planted ranks
    for task in (planted, sentiment):
        assert {run["lr"] for run in task["runs"] if run["method"] != "uniform"} == {task["lr_choice"]["uniform"]["0.5"]}
        for run in task["runs"]:
            assert run["spent"] <= run["budget"] and len(run["train_loss"]) == cfg.steps
            assert [s for s, _ in run["val_curve"]] == [2, 4, 5]
    for run in planted["runs"]:
        if run["method"] == "oracle":
            assert run["spent"] == run["budget"]                 # P* and 2 P*: exactly P
    assert planted["summary"]["gradient"]["0.5"]["spearman_mean"] is not None

    demo = json.loads((tmp_path / "demo_results.json").read_text())
    assert isinstance(demo["machine"], str) and "load average" in demo["machine"]
    assert demo["wall_s"] == pytest.approx(data["seconds"]) and 0 < demo["wall_s"] < 3600
    assert 0 < demo["cpu_s"] <= demo["wall_s"] * (cfg.threads + 1)  # this process's CPU time
    for method in ("uniform", "gradient", "oracle"):
        row = demo["methods"][method]
        assert len(row["test_loss"]) == 1 and len(row["gap_closed"]) == 1 and 0 <= row["coverage"] <= 1
    assert demo["methods"]["oracle"]["gap_closed"] == [1.0] and demo["methods"]["oracle"]["coverage"] == 1.0

    sent = json.loads((tmp_path / "sentiment_results.json").read_text())
    assert set(sent["methods"]) == {"uniform", "gradient"}
    assert all(len(r["accuracy"]) == 1 and 0 <= r["accuracy"][0] <= 1 for r in sent["methods"].values())
    assert sent["methods"]["uniform"]["accuracy"] == [r["metric"] for r in sentiment["runs"]
                                                      if r["method"] == "uniform" and r["lr"] == sent["lr"] and r["level"] == 0.5]

    text = (tmp_path / "results.txt").read_text()
    assert "held-out rel_loss" in text and "held-out accuracy" in text and "wall time" in text
    pngs = sorted(tmp_path.rglob("*.png"))
    names = {p.name for p in pngs}
    if importlib.util.find_spec("matplotlib") is None:  # the GPU image: the run skips its plots, says so
        assert not pngs and "plots skipped: matplotlib is not installed" in out
        return
    assert {"planted_rel_loss_vs_budget.png", "sentiment_accuracy_vs_budget.png", "planted_uniform.png",
            "planted_gradient.png", "sentiment_uniform.png", "planted_truth.png", "demo_gap_closed.png",
            "demo_val_loss.png", "demo_rank_heatmaps.png"} <= names
    for p in pngs:
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(result["plots"]) == sorted(str(p.relative_to(tmp_path)) for p in pngs)
    assert not list(tmp_path.rglob(".*"))  # atomic writes leave no temporary file or staging folder

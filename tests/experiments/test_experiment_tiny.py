"""A tiny run of the whole experiment (1 seed, a few steps, 2 methods) and its artefacts."""

import json
import math

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments.runner import run_experiment

pytestmark = pytest.mark.slow


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_tiny_experiment_writes_table_json_and_plots(tmp_path, capsys):
    cfg = presets.tiny(methods=("uniform", "gradient"))
    result = run_experiment(cfg, out_dir=tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "uniform LoRA" in out and "closed form, gradient" in out and "beat uniform" in out

    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["tasks"]) == {"planted", "topics"}
    assert all(math.isfinite(x) for x in _numbers(data))
    for task in data["tasks"].values():
        assert len(task["runs"]) == 2 * 2  # 2 methods x 2 budgets x 1 seed x 1 learning rate
        for method in ("uniform", "gradient"):
            assert set(task["summary"][method]) == {"1.0", "2.0"}
        for run in task["runs"]:
            assert run["spent"] <= run["budget"] and len(run["train_loss"]) == cfg.steps
    assert data["tasks"]["planted"]["summary"]["gradient"]["1.0"]["spearman_mean"] is not None

    text = (tmp_path / "results.txt").read_text()
    assert "held-out rel_loss" in text and "held-out accuracy" in text
    pngs = sorted(tmp_path.rglob("*.png"))
    names = {p.name for p in pngs}
    assert {"planted_rel_loss_vs_budget.png", "topics_accuracy_vs_budget.png", "planted_uniform.png",
            "planted_gradient.png", "topics_uniform.png", "planted_truth.png"} <= names
    for p in pngs:
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(result["plots"]) == sorted(str(p.relative_to(tmp_path)) for p in pngs)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files

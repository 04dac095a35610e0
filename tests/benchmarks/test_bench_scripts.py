"""The benchmark scripts run end to end at a tiny size (numbers are not checked, artefacts are)."""

import csv
import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sensitivity_tiny_writes_csv_and_png(tmp_path):
    bench = _load("bench_sensitivity")
    assert bench.main(["--size", "tiny", "--max-probes", "8", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sensitivity.csv")))
    metrics = {(r["provider"], r["metric"]) for r in rows}
    assert {("lorambo", "time_to_target"), ("sequential_loop", "time_to_target"),
            ("autograd", "one_hvp"), ("train_step", "with_fisher_proxy")} <= metrics
    assert all(math.isfinite(float(r["value"])) and float(r["value"]) > 0 for r in rows)
    assert (tmp_path / "sensitivity.png").stat().st_size > 5000

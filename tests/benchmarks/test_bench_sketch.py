"""benchmarks/bench_sketch.py runs end to end at a tiny size and appends complete rows."""

import csv
import importlib.util
import math
from pathlib import Path

import torch

from cpu_model import cpu_device

ROOT = Path(__file__).resolve().parents[2]


def test_bench_sketch_tiny_appends_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_sketch", ROOT / "benchmarks" / "bench_sketch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        for _ in range(2):  # the second run appends below the first
            assert bench.main(["--tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader(open(tmp_path / "sketch.csv")))
    half = len(rows) // 2
    assert len(rows) == 2 * half and half >= 4
    assert {(r["section"], r["provider"]) for r in rows} >= {("growth", "loop"), ("growth", "grouped"),
                                                             ("dots", "loop"), ("dots", "foreach")}
    for r in rows:
        assert r["device"] == cpu_device() and r["load"] and r["threads"] == "1"
        assert math.isfinite(float(r["ms_median"])) and float(r["ms_median"]) > 0

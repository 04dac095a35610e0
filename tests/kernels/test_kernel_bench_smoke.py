"""benchmarks/bench_lora_linear.py runs end to end in its --cpu-smoke mode (interpreter, tiny)."""

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lora_linear.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_lora_linear", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is for CPU machines")
def test_cpu_smoke_writes_csv_markdown_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    bench = load_bench()
    out = tmp_path / "bench.csv"
    assert bench.main(["--cpu-smoke", "--providers", "base,peft_style,lorambo", "--modes", "fwd_bwd",
                       "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["provider"] for r in rows} == {"base", "peft_style", "lorambo"}
    assert {(r["rank"], r["capacity"]) for r in rows if r["provider"] == "lorambo"} == {("4", "4"), ("4", "16")}
    assert all(float(r["ms_median"]) > 0 and r["torch"] and r["device"] for r in rows)
    assert "| fwd_bwd | 8 | 32→48 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


def test_without_cuda_the_full_benchmark_exits_cleanly(capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert load_bench().main([]) == 0
    assert "no CUDA device" in capsys.readouterr().err

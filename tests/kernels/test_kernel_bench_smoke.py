"""benchmarks/bench_lora_linear.py without CUDA. Its --cpu-smoke run (interpreter, tiny) is checked
end to end, with every artefact, by tests/test_gpu_check.py."""

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


def test_without_cuda_the_full_benchmark_exits_cleanly(capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert load_bench().main([]) == 0
    assert "no CUDA device" in capsys.readouterr().err

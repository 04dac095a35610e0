"""The pytest-benchmark suite (benchmarks/test_*.py, ``make bench``) times the same inputs on
every run: its layers, pools, gradients and batches are drawn from seeded generators, whatever
the state of torch's global generator, and building them leaves that state as it was."""

import importlib.util
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the suite imports its helpers (providers) by name
    spec = importlib.util.spec_from_file_location(f"_seeded_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _built_twice(build):
    """``build()`` from two different global generator states, each left as it was."""
    out = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        out.append(build())
        assert torch.equal(torch.get_rng_state(), state)
    return out


def _floats(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in module.state_dict().values() if t.is_floating_point()]


def test_reference_op_benchmark_builds_the_same_layers_and_inputs(monkeypatch):
    bench = _load("test_bench_reference_op", monkeypatch)
    first, second = _built_twice(bench._layers)
    for name, layer in first.items():
        assert all(torch.equal(a, b) for a, b in zip(_floats(layer), _floats(second[name]), strict=True)), name
    for mode in ("fwd", "fwd_bwd"):
        (x1, g1), (x2, g2) = _built_twice(lambda: bench._inputs(mode))
        assert torch.equal(x1, x2) and torch.equal(g1, g2) and x1.requires_grad == (mode == "fwd_bwd")


def test_optimizer_benchmark_builds_the_same_pools_and_gradients(monkeypatch):
    bench = _load("test_bench_optim", monkeypatch)
    first, second = _built_twice(lambda: bench._pools(8, torch.bfloat16))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)

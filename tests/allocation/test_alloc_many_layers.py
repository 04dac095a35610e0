"""allocate on thousands of layers: the input checks stay linear, and the vectorised curve checks
reject exactly what the per-layer checks reject, naming the first bad layer."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import lorambo
from lorambo.allocation import validate

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_allocate_many",
                                                  ROOT / "benchmarks" / "bench_allocate_many.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_runs_tiny(capsys, tmp_path):
    argv = ["--layers", "50", "--shapes", "random", "minilm", "--problems", "1", "--repeats", "1"]
    assert _bench().main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in (*lorambo.allocation.METHODS, "plan_growth", "plan_moves", "alora_plan"))
    assert len((tmp_path / "allocate.csv").read_text().splitlines()) == 1 + 2 * 5 + 4


def test_key_checks_build_the_name_set_once(monkeypatch):
    """The unknown-key check used to build set(names) per key: quadratic in the layer count."""
    built = []
    real_set = set

    class CountingSet(real_set):
        def __init__(self, *args):
            built.append(1)
            super().__init__(*args)

    monkeypatch.setattr(validate, "set", CountingSet, raising=False)
    n = 2000
    dims = {f"l{i}": (8, 8) for i in range(n)}
    sens = {k: 1.0 for k in dims}
    ranks = lorambo.allocate(dims, sens, budget=16 * n, capacities=dict.fromkeys(dims, 4))
    assert len(built) <= 4
    assert sum(r * 16 for r in ranks.values()) <= 16 * n and max(ranks.values()) <= 4


@pytest.mark.parametrize("kind", ["spectrum", "benefit", "tail"])
def test_vectorised_curve_check_matches_the_per_layer_check(kind):
    rng = np.random.default_rng(1)
    names = tuple(f"layer{i}" for i in range(300))
    good = {n: np.sort(rng.random(6))[::-1] ** (2 if kind == "tail" else 1) for n in names}
    if kind == "tail":
        good = {n: np.linspace(1.0, 0.0, 6) ** 2 * (1 + i) for i, n in enumerate(names)}
    out = validate.validate_curves("curves", "m", good, names, kind)
    assert all(np.array_equal(a, good[n]) for a, n in zip(out, names))
    for bad_value in (np.nan, -np.inf, 5.0):
        curves = dict(good)
        for victim in ("layer77", "layer201"):  # two bad layers: the first in order is named
            arr = curves[victim].copy()
            arr[3] = bad_value if bad_value != 5.0 else arr[1] * 5 + 1
            curves[victim] = arr
        curves["layer150"] = np.ones(4) if kind != "spectrum" else np.ones(4)  # another length, valid
        with pytest.raises(ValueError) as vectorised:
            validate.validate_curves("curves", "m", curves, names, kind)
        with pytest.raises(ValueError) as alone:
            validate._check_curve(curves["layer77"], "curves", "layer77", kind)
        assert str(vectorised.value) == str(alone.value) and "layer77" in str(alone.value)

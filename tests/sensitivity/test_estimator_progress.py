"""Progress bars of the estimators that pass over the batches: on stderr with progress=True, with
the total they count; none with False, by default when stderr is no terminal, or on a process
other than the main one; the same numbers either way."""

import re

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity import ablation_scores, data_covariance, gradient_sensitivity, hessian_opnorm
from lorambo.sensitivity import progress as progress_module

DT = torch.float64
RANKS = {"0": 2, "2": 1}


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _setup():
    """A LoRA model with trained-looking adapters (ranks 2 and 1) and three seeded batches."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 2, dtype=DT))
    lorambo.configure_model(model, RANKS, capacity={"0": 3, "2": 2})
    for layer in lorambo.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 5, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT))
               for _ in range(3)]
    return model, batches


def _values(result):
    """Results as comparable plain data (tensors to lists, Estimates and ablations to tuples)."""
    out = {}
    for name, v in result.items():
        if isinstance(v, torch.Tensor):
            out[name] = v.tolist()
        elif hasattr(v, "removed"):
            out[name] = (v.removed.tolist(), v.alone.tolist(), v.full_loss, v.empty_loss)
        else:
            out[name] = (v.value, v.stderr, v.num_probes) if hasattr(v, "value") else v
    return out


# name: (call with progress=..., the bar's description, its final total)
ESTIMATORS = {
    "gradient_sensitivity": (lambda m, b, p: gradient_sensitivity(m, mse, b, **p), 3),
    "data_covariance": (lambda m, b, p: data_covariance(m, mse, b, **p), 3),
    # full loss, one per component removed, the empty loss, one per component alone: 1 + 3 + 1 + 3
    "ablation_scores": (lambda m, b, p: ablation_scores(m, mse, b, **p), 8),
    # tol=0: no layer converges early, so all num_iters iterations run
    "hessian_opnorm": (lambda m, b, p: hessian_opnorm(m, mse, b, num_iters=4, tol=0.0, **p), 4),
}


def _bar_counts(err: str, desc: str) -> tuple[int, int]:
    assert desc in err, err
    counts = re.findall(r"(\d+)/(\d+) \[", err.split("\r")[-1])
    assert counts, err
    return tuple(map(int, counts[-1]))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_bar_on_stderr_only_when_asked_with_the_same_results(name, capsys):
    call, total = ESTIMATORS[name]
    model, batches = _setup()
    quiet = call(model, batches, {"progress": False})
    assert capsys.readouterr() == ("", "")
    shown = call(model, batches, {"progress": True})
    out, err = capsys.readouterr()
    assert out == ""
    assert _bar_counts(err, name) == (total, total)
    assert _values(shown) == _values(quiet)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_no_bar_by_default_when_stderr_is_no_terminal(name, capsys):
    call, _ = ESTIMATORS[name]
    model, batches = _setup()
    call(model, batches, {})
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_no_bar_on_a_process_other_than_the_main_one(name, capsys, monkeypatch):
    call, _ = ESTIMATORS[name]
    model, batches = _setup()
    monkeypatch.setattr(progress_module, "is_main_process", lambda: False)
    call(model, batches, {"progress": True})
    assert capsys.readouterr().err == ""


def test_opnorm_bar_ends_full_when_every_layer_converges_early(capsys):
    model, batches = _setup()
    est = hessian_opnorm(model, mse, batches, num_iters=500, tol=1e-3, progress=True)
    done = max(e.num_probes for e in est.values())
    assert done < 500
    assert _bar_counts(capsys.readouterr().err, "hessian_opnorm") == (done, done)


@pytest.mark.parametrize("method, desc", [("gradient", "gradient_sensitivity"), ("data", "data_covariance"),
                                          ("ablation", "ablation_scores")])
def test_compute_sensitivities_passes_progress_to_the_estimator(method, desc, capsys):
    model, batches = _setup()
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=40, sensitivity_method=method)
    quiet = opt.compute_sensitivities(batches, mse, progress=False)
    assert capsys.readouterr().err == ""
    shown = opt.compute_sensitivities(batches, mse, progress=True)
    assert desc in capsys.readouterr().err
    assert shown == quiet


@pytest.mark.parametrize("method, allocation, desc", [("gradient", "closed_form", "gradient_sensitivity"),
                                                      ("data", "data_weighted", "data_covariance")])
def test_compute_optimal_ranks_passes_progress_to_its_passes(method, allocation, desc, capsys):
    """Without the argument, a script that wants no bar on a terminal could not turn off the bar
    of the passes compute_optimal_ranks runs (the sensitivities, data_weighted's covariances)."""
    model, batches = _setup()
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=40, sensitivity_method=method, allocation=allocation)
    quiet = opt.compute_optimal_ranks(batches, mse, progress=False)
    assert desc not in capsys.readouterr().err
    shown = opt.compute_optimal_ranks(batches, mse, progress=True)
    assert desc in capsys.readouterr().err
    assert shown == quiet
    with pytest.raises(TypeError, match=r"LoRAMBoOptimizer.compute_optimal_ranks: progress must be True, False or "
                                        r"None, got 'no'"):
        opt.compute_optimal_ranks(batches, mse, progress="no")


def test_hutchinson_bar_ends_full_when_stderr_target_stops_it_early(capsys):
    # the bar stopped at e.g. 16/256 probes: it read as a pass cut short, while opnorm's and the
    # sketches' bars end at the products actually taken
    from lorambo.sensitivity import hessian_trace

    model, batches = _setup()
    est = hessian_trace(model, mse, batches, num_probes=256, probes_per_pass=4, stderr_target=10.0, progress=True)
    done = {e.num_probes for e in est.values()}
    assert len(done) == 1 and 2 <= min(done) < 256
    assert _bar_counts(capsys.readouterr().err, "hessian_trace") == (min(done), min(done))

"""The experiment's sensitivity step: lorambo's warnings stay visible, its bars stay out."""

import io
import types

import pytest
import torch
from torch import nn

import lorambo
from lorambo.experiments import config as presets
from lorambo.experiments.methods import compute_sensitivities


class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(6, 4), nn.Linear(4, 4)


def test_a_warning_other_than_the_recorded_note_reaches_the_user():
    """compute_sensitivities recorded every warning to find the negative-trace note and dropped
    the rest: a target the loss never reaches was skipped without a word."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g))]
    task = types.SimpleNamespace(fresh_student=lambda seed: _Student(), names=["used", "unused"],
                                 dims={"used": (4, 6), "unused": (4, 4)},
                                 loss=lambda model, b: (model.used(b[0]) - b[1]).pow(2).mean())
    with pytest.warns(RuntimeWarning, match=r"no gradient reaches layer\(s\) \['unused'\]"):
        out, _ = compute_sensitivities(task, presets.tiny(), 0, calib, ["gradient"])
    assert set(out["gradient"]) == {"used"} and out["gradient"]["used"] > 0


class _Terminal(io.StringIO):
    def isatty(self):  # hessian_trace's progress=None draws only on a terminal
        return True


def test_the_experiments_hessian_draws_no_bar_of_its_own(monkeypatch):
    """Its hessian_trace bar (progress=None on a terminal) was drawn inside the experiment's bar,
    from spawned workers too, over the experiment's line."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g))]

    def student(seed):
        model = _Student()
        model.bert = types.SimpleNamespace(set_attn_implementation=lambda name: None)
        return model

    task = types.SimpleNamespace(fresh_student=student, names=["used"], dims={"used": (4, 6)},
                                 loss=lambda model, b: (model.used(b[0]).tanh() - b[1]).pow(2).mean())
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    out, _ = compute_sensitivities(task, presets.tiny().replace(hessian_probes=4), 0, calib, ["hessian"])
    assert set(out["hessian"]) == {"used"}
    assert terminal.getvalue() == ""
    # the allocator's own default still draws it on a terminal
    opt = lorambo.LoRAMBoOptimizer(_Student(), total_budget=100, target_modules=["used"], num_probes=4)
    opt.compute_sensitivities(calib, task.loss)
    assert "hessian_trace" in terminal.getvalue()

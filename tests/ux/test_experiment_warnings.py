"""The experiment's sensitivity step keeps lorambo's warnings visible."""

import types

import pytest
import torch
from torch import nn

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

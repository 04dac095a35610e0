"""repr(LoRAMBoCallback) shows the allocator and importance it drives (their own reprs) and
the decisions it has seen, and never raises, not even for one whose constructor failed half-way."""

import pytest
import torch

pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.sensitivity import AdaLoRAImportance  # noqa: E402


def test_repr_shows_what_the_callback_drives():
    torch.manual_seed(0)
    model = lorambo.configure_model(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), 2)
    allocator = lorambo.LoRAMBoOptimizer(model, total_budget=100, interval=10)
    callback = LoRAMBoCallback(allocator, importance=AdaLoRAImportance(model))
    assert repr(callback) == (f"LoRAMBoCallback(allocator={allocator!r}, importance=AdaLoRAImportance(2 layers, "
                              "beta1=0.85, beta2=0.85, updates=0), decisions=0)")
    assert repr(LoRAMBoCallback.__new__(LoRAMBoCallback)) == \
        "LoRAMBoCallback(allocator=None, importance=None, decisions=0)"

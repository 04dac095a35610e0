"""Every lorambo warning is reported at the user's line, whatever path reaches it.

``filterwarnings(..., module=...)`` and the default filter's once-per-location rule act on the
frame a warning is attributed to; a fixed ``stacklevel`` would put the same warning at a line
inside lorambo when it comes through the growth schedule or a torch optimizer step hook."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

import lorambo
from lorambo.nn import optimizer_state


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)


def _sites(record):
    return [(w.filename, w.category, str(w.message)[:60]) for w in record]


def _only_here(record, category, text):
    hits = [w for w in record if issubclass(w.category, category) and text in str(w.message)]
    assert hits, f"no {category.__name__} containing {text!r}: {_sites(record)}"
    assert [w.filename for w in hits] == [__file__] * len(hits), _sites(hits)


def _adam_stepped(model):
    adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _loss(model, _batch()).backward()
    adam.step()
    adam.zero_grad()
    return adam


def test_shared_step_warning_from_set_rank_and_from_the_growth_schedule(monkeypatch):
    model = lorambo.configure_model(_model(), 1, capacity=4)
    adam = _adam_stepped(model)
    monkeypatch.setattr(optimizer_state, "_WARNED_SHARED_STEP", WeakIdKeyDictionary())
    with warnings.catch_warnings(record=True) as direct:
        warnings.simplefilter("always")
        model[0].set_rank(2, optimizer=adam)
    _only_here(direct, UserWarning, "keeps one step count per parameter")

    opt = lorambo.LoRAMBoOptimizer(model, total_budget=10_000, interval=1)
    monkeypatch.setattr(optimizer_state, "_WARNED_SHARED_STEP", WeakIdKeyDictionary())
    with warnings.catch_warnings(record=True) as scheduled:
        warnings.simplefilter("always")
        with opt.capture(0, _batch()):
            _loss(model, _batch()).backward()
        assert opt.step(0, optimizer=adam)
    _only_here(scheduled, UserWarning, "keeps one step count per parameter")


def test_decision_step_without_capture_and_stale_state_warnings():
    model = lorambo.configure_model(_model(), 1, capacity=4)
    adam = _adam_stepped(model)
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=10_000, interval=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert opt.step(0, optimizer=adam) == []          # nothing captured
        with opt.capture(1, _batch()):
            _loss(model, _batch()).backward()
        assert opt.step(1)                                 # grows without the Adam that holds state
    _only_here(record, RuntimeWarning, "is a rank decision step but")
    _only_here(record, lorambo.nn.StaleOptimizerStateWarning, "without its optimizer")


def test_optimizer_step_hook_warning_points_at_the_step_call():
    model = _model()
    early = torch.optim.SGD(model.parameters(), lr=0.1)  # built before configure_model
    lorambo.configure_model(model, 2)
    _loss(model, _batch()).backward()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        early.step()
    _only_here(record, UserWarning, "train no adapter")


def test_unreached_layer_warning_through_compute_optimal_ranks():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = _model(), nn.Linear(4, 4)

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=200, sensitivity_method="gradient",
                                   target_modules=["net.0", "net.2", "unused"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt.compute_optimal_ranks([_batch()], _loss)
    _only_here(record, RuntimeWarning, "no gradient reaches layer(s) ['unused']")


def test_a_filter_on_the_users_module_silences_it():
    """What the attribution is for: a filter for this module catches the warning, raised as an error."""
    model = lorambo.configure_model(_model(), 1, capacity=4)
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=10_000, interval=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", category=RuntimeWarning, module=__name__)
        with pytest.raises(RuntimeWarning, match="is a rank decision step"):
            opt.step(0)

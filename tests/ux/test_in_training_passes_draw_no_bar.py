"""The ablation passes that run inside the user's training step (an ALoRA round, the scores of
LoRAMBoOptimizer's rank moves) draw no bar of their own, also on a terminal: the user's loop has
its own, which a second one would break up every few steps."""

import io
import sys

import torch
from torch import nn

import lorambo
from lorambo.allocation.alora import alora_round
from lorambo.sensitivity import ablation_scores

DT = torch.float64


class Terminal(io.StringIO):
    def isatty(self):
        return True


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 4, dtype=DT))
    lorambo.configure_model(model, 2, capacity=3)
    g = torch.Generator().manual_seed(2)
    for layer in lorambo.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B[:, :2].copy_(torch.randn(layer.out_features, 2, generator=g, dtype=DT))
    batches = [(torch.randn(5, 6, generator=g, dtype=DT), torch.randn(5, 4, generator=g, dtype=DT)) for _ in range(2)]
    return model, batches


def test_a_terminal_shows_the_bar_of_a_direct_call(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    model, batches = _trained()
    ablation_scores(model, mse, batches)
    assert "ablation_scores" in sys.stderr.getvalue()


def test_alora_round_draws_no_bar_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    model, batches = _trained()
    alora_round(model, lorambo.lora_layers(model), mse, batches, n_prune=1, step=4)
    assert sys.stderr.getvalue() == ""


def test_rank_move_scores_draw_no_bar_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    model, batches = _trained()
    opt = lorambo.LoRAMBoOptimizer(model, 60, sensitivity_method="gradient", heldout_batches=batches, loss_fn=mse)
    assert set(opt._heldout_scores()) == set(opt.names)
    assert sys.stderr.getvalue() == ""

"""float16 parameters that are not pools (a float16 head to save) keep Adam's moments in float32
too. They went through torch's AdamW with float16 moments: a gradient of 1e-3 has a squared
gradient that rounds to 0 there, so the first step was m / eps = -inf in every element, and the
second step stopped with "the exp_avg ... is torch.float16 ..., but the parameter is now
torch.float16". Checked against AdamW in float64 on the same float16 gradients."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear

LR, WD, B1, B2, EPS = 1e-2, 0.1, 0.9, 0.999, 1e-8
U16 = 2.0 ** -11  # float16's unit roundoff


def _model():
    torch.manual_seed(3)
    model = nn.Sequential(LoRAMBoLinear(nn.Linear(12, 10), rank=2, capacity=4), nn.Linear(10, 5)).half()
    model[0].base_layer.requires_grad_(False)
    return model


class _Float64AdamW:
    """torch.optim.AdamW's formulas in float64 for whole parameters."""

    def __init__(self, params, amsgrad):
        self.values = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(v) for v in self.values]
        self.v = [torch.zeros_like(v) for v in self.values]
        self.vmax = [torch.zeros_like(v) for v in self.values]
        self.t, self.amsgrad = 0, amsgrad

    def step(self, grads):
        self.t += 1
        for p, m, v, vmax, g in zip(self.values, self.m, self.v, self.vmax, grads):
            g = g.double()
            p.mul_(1 - LR * WD)
            m.mul_(B1).add_((1 - B1) * g)
            v.mul_(B2).add_((1 - B2) * g * g)
            torch.maximum(vmax, v, out=vmax)
            second = vmax if self.amsgrad else v
            p.sub_(LR * (m / (1 - B1 ** self.t)) / ((second / (1 - B2 ** self.t)).sqrt() + EPS))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_a_float16_head_with_small_gradients_follows_float64_adamw(amsgrad):
    model = _model()
    opt = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD,
                              amsgrad=amsgrad)
    head = list(model[1].parameters())
    ref = _Float64AdamW(head, amsgrad)
    gen = torch.Generator().manual_seed(7)
    steps = 8
    for _ in range(steps):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).half()
        grads = [p.grad.clone() for p in head]
        opt.step()
        ref.step(grads)
    for p, want, second in zip(head, ref.values, ref.v):
        got = p.detach().double()
        bound = (steps + 1) * U16 * float(want.abs().max())  # one float16 rounding per step, at most
        assert float((got - want).abs().max()) <= bound, (list(p.shape), float((got - want).abs().max()), bound)
        state = opt.state[p]
        assert state["exp_avg_sq"].dtype == torch.float32 and float(state["step"]) == steps
        torch.testing.assert_close(state["exp_avg_sq"].double(), second, rtol=1e-5, atol=0)


def test_a_float16_heads_moments_survive_a_state_dict_round_trip_unrounded():
    model = _model()
    opt = lorambo.optim.AdamW(model[1].parameters(), lr=LR)
    for p in model[1].parameters():
        p.grad = (torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 1e-3).half()
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[model[1].weight].items()}
    assert saved["exp_avg_sq"].min() > 0 and saved["exp_avg_sq"].dtype == torch.float32  # ~1e-9: 0 in float16
    opt.load_state_dict(opt.state_dict())  # torch alone rounds every moment to the parameter's float16
    for key, value in saved.items():
        assert torch.equal(opt.state[model[1].weight][key], value), key

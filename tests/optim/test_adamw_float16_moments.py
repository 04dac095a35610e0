"""float16 pools keep Adam's moments in float32: in float16 the second moment of LoRA-sized
gradients (1e-3) underflows to 0, and m / sqrt(v) then took steps of hundreds of learning rates.
Checked against AdamW in float64 on the same float16 gradients, on both update paths."""

import torch

import lorambo
from lorambo import LoRAMBoLinear

LR, WD, B1, B2, EPS = 1e-2, 0.1, 0.9, 0.999, 1e-8
U16 = 2.0 ** -11  # float16's unit roundoff


def _layer():
    gen = torch.Generator().manual_seed(3)
    layer = LoRAMBoLinear(torch.nn.Linear(12, 10), rank=2, capacity=4).half()
    with torch.no_grad():
        layer.lora_B[:, :2] = (torch.randn(10, 2, generator=gen) * 0.1).half()
    return layer


class _Float64AdamW:
    """AdamW per slot in float64: slot j of a pool counts its own steps from its activation."""

    def __init__(self, layer):
        self.values = {n: getattr(layer, n).detach().double().clone() for n in ("lora_A", "lora_B")}
        self.m = {n: torch.zeros_like(v) for n, v in self.values.items()}
        self.v = {n: torch.zeros_like(v) for n, v in self.values.items()}
        self.t = {n: torch.zeros(4, dtype=torch.float64) for n in self.values}

    def activate(self, layer, slots):
        for name, dim in (("lora_A", 0), ("lora_B", 1)):
            for j in slots:
                self.values[name].select(dim, j).copy_(getattr(layer, name).detach().select(dim, j).double())

    def step(self, layer):
        for name, dim in (("lora_A", 0), ("lora_B", 1)):
            r = layer.rank
            p, m, v = (t.narrow(dim, 0, r) for t in (self.values[name], self.m[name], self.v[name]))
            g = getattr(layer, name).grad.narrow(dim, 0, r).double()
            self.t[name][:r] += 1
            t = self.t[name][:r].view((r, 1) if dim == 0 else (1, r))
            p.mul_(1 - LR * WD)
            m.mul_(B1).add_((1 - B1) * g)
            v.mul_(B2).add_((1 - B2) * g * g)
            p.sub_(LR * (m / (1 - B1 ** t)) / ((v / (1 - B2 ** t)).sqrt() + EPS))


def _grads(layer, gen):
    for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        grad = torch.zeros_like(param)
        grad.narrow(dim, 0, layer.rank).copy_(torch.randn(grad.narrow(dim, 0, layer.rank).shape, generator=gen) * 1e-3)
        param.grad = grad


def test_float16_pools_with_small_gradients_follow_float64_adamw():
    layer = _layer()
    opt = lorambo.optim.AdamW(layer.parameters(), lr=LR, weight_decay=WD)
    ref = _Float64AdamW(layer)
    gen = torch.Generator().manual_seed(7)
    steps = 8
    for step in range(steps):
        if step == 4:  # a slot activated late counts its own steps
            layer.set_rank(3, optimizer=opt, generator=torch.Generator().manual_seed(1))
            ref.activate(layer, [2])
        _grads(layer, gen)
        opt.step()
        ref.step(layer)
    for name in ("lora_A", "lora_B"):
        got, want = getattr(layer, name).detach().double(), ref.values[name]
        # one float16 rounding of the stored value per step, at most
        bound = (steps + 1) * U16 * float(want.abs().max())
        assert float((got - want).abs().max()) <= bound, (name, float((got - want).abs().max()), bound)
        assert opt.state[getattr(layer, name)]["exp_avg_sq"].dtype == torch.float32


def test_float16_moments_survive_a_state_dict_round_trip_unrounded():
    layer = _layer()
    opt = lorambo.optim.AdamW(layer.parameters(), lr=LR, weight_decay=WD)
    gen = torch.Generator().manual_seed(7)
    _grads(layer, gen)
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[layer.lora_B].items()}
    assert saved["exp_avg_sq"][:, :2].min() > 0  # (1 - beta2) g^2 ~ 1e-9: 0 in float16
    assert saved["exp_avg_sq"].dtype == torch.float32
    opt.load_state_dict(opt.state_dict())  # torch alone rounds every moment to the pool's float16
    for key, value in saved.items():
        assert torch.equal(opt.state[layer.lora_B][key], value), key


def test_a_float32_model_cast_to_float16_continues_with_its_float32_moments():
    layer = LoRAMBoLinear(torch.nn.Linear(12, 10), rank=2, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :2] = torch.randn(10, 2, generator=torch.Generator().manual_seed(3)) * 0.1
    opt = lorambo.optim.AdamW(layer.parameters(), lr=LR, weight_decay=WD)
    gen = torch.Generator().manual_seed(7)
    _grads(layer, gen)
    opt.step()
    layer.half()
    ref = _Float64AdamW(layer)  # takes over the optimizer's float32 moments
    for name in ("lora_A", "lora_B"):
        state = opt.state[getattr(layer, name)]
        ref.m[name], ref.v[name] = state["exp_avg"].double().clone(), state["exp_avg_sq"].double().clone()
        ref.t[name] = state["slot_step"].double().clone()
    _grads(layer, gen)
    opt.step()
    ref.step(layer)
    for name in ("lora_A", "lora_B"):
        got, want = getattr(layer, name).detach().double(), ref.values[name]
        assert float((got - want).abs().max()) <= 2 * U16 * float(want.abs().max())

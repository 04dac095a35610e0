"""lorambo.optim.AdamW on rank pools against AdamW written out in float64 here, per slot: every
active slot counts its own Adam steps from its activation, inactive slots never move.

Run on both pool update paths (tests/optim/conftest.py), with slots of three ages in one pool
and the settings whose code is conditional: weight decay (1.0 included: the decay factor
1 - lr * wd must be applied whatever its value), amsgrad, maximize.
"""

import pytest
import torch

from lorambo import LoRAMBoLinear
from lorambo.optim import AdamW

LR, BETAS, EPS = 0.05, (0.8, 0.95), 1e-6


class Float64Adam:
    """AdamW of one pool, elementwise in float64, with one step count per slot."""

    def __init__(self, pool: torch.Tensor, dim: int, weight_decay: float, amsgrad: bool, maximize: bool):
        self.value = pool.detach().double().clone()
        self.dim, self.weight_decay, self.amsgrad, self.maximize = dim, weight_decay, amsgrad, maximize
        self.m, self.v, self.v_max = (torch.zeros_like(self.value) for _ in range(3))
        self.count = torch.zeros(pool.shape[dim], dtype=torch.float64)

    def activate(self, pool: torch.Tensor, lo: int, hi: int) -> None:
        """Slots lo..hi-1 start afresh (moments and counts 0) from the layer's new values."""
        fresh = pool.detach().double().narrow(self.dim, lo, hi - lo)
        self.value.narrow(self.dim, lo, hi - lo).copy_(fresh)
        for moment in (self.m, self.v, self.v_max):
            moment.narrow(self.dim, lo, hi - lo).zero_()
        self.count[lo:hi] = 0

    def step(self, grad: torch.Tensor, rank: int) -> None:
        b1, b2 = BETAS
        g = -grad.double() if self.maximize else grad.double()
        self.count[:rank] += 1
        shape = [1, 1]
        shape[self.dim] = -1
        t = self.count.view(shape)
        active = torch.zeros_like(self.value, dtype=torch.bool)
        active.narrow(self.dim, 0, rank).fill_(True)
        m = b1 * self.m + (1 - b1) * g
        v = b2 * self.v + (1 - b2) * g * g
        v_max = torch.maximum(self.v_max, v) if self.amsgrad else v
        second = v_max if self.amsgrad else v
        bc1, bc2 = 1 - b1 ** t.clamp(min=1), 1 - b2 ** t.clamp(min=1)
        decayed = self.value * (1 - LR * self.weight_decay)
        new = decayed - LR / bc1 * m / (second.sqrt() / bc2.sqrt() + EPS)
        for name, after in (("value", new), ("m", m), ("v", v), ("v_max", v_max)):
            getattr(self, name).copy_(torch.where(active, after, getattr(self, name)))


@pytest.mark.parametrize("options", [dict(weight_decay=1.0), dict(weight_decay=0.3, amsgrad=True),
                                     dict(weight_decay=0.0, maximize=True)])
def test_pools_with_slots_of_three_ages_follow_float64_adamw(options):
    torch.manual_seed(11)
    layer = LoRAMBoLinear(torch.nn.Linear(7, 6, dtype=torch.float64), rank=2, capacity=6)
    opt = AdamW(layer.parameters(), lr=LR, betas=BETAS, eps=EPS, **options)
    refs = {name: Float64Adam(getattr(layer, name), dim, options.get("weight_decay", 0.0),
                              options.get("amsgrad", False), options.get("maximize", False))
            for name, dim in (("lora_A", 0), ("lora_B", 1))}
    schedule = [2, 2, 4, 4, 4, 5, 5, 3, 3]  # growth twice (slots of three ages), then a shrink
    for rank in schedule:
        if rank != layer.rank:
            old = layer.rank
            layer.set_rank(rank, optimizer=opt)
            if rank > old:
                for name, ref in refs.items():
                    ref.activate(getattr(layer, name), old, rank)
        for name, dim in (("lora_A", 0), ("lora_B", 1)):
            param = getattr(layer, name)
            grad = torch.zeros_like(param)
            grad.narrow(dim, 0, rank).copy_(torch.randn_like(grad.narrow(dim, 0, rank)))
            param.grad = grad
        opt.step()
        for name, ref in refs.items():
            ref.step(getattr(layer, name).grad, rank)
    for name, dim in (("lora_A", 0), ("lora_B", 1)):
        param, ref = getattr(layer, name), refs[name]
        active = param.detach().narrow(dim, 0, layer.rank)
        torch.testing.assert_close(active, ref.value.narrow(dim, 0, layer.rank), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[param]["exp_avg"].narrow(dim, 0, layer.rank),
                                   ref.m.narrow(dim, 0, layer.rank), rtol=1e-10, atol=1e-12)
        assert opt.state[param]["slot_step"][:layer.rank].tolist() == ref.count[:layer.rank].tolist()
        # amsgrad's running maximum is a third pool-sized tensor: kept only where amsgrad is on
        assert ("max_exp_avg_sq" in opt.state[param]) == options.get("amsgrad", False)
        assert torch.count_nonzero(param.detach().narrow(dim, layer.rank, 6 - layer.rank)) == 0
    assert refs["lora_A"].count.tolist()[:3] == [9, 9, 7]  # three ages in the pool at the end

"""An optimizer that keeps a pool's moments quantized (bitsandbytes' 8-bit optimizers: uint8 codes
of the parameter's shape, decoded as a code map times the scale of their block) cannot have
slots reset or moved: zeroing a code decodes to minus the block's scale, not zero, so a dropped
slot was pushed off zero by the next step and a grown one started with a large stale moment.
Every rank change given such an optimizer is refused before anything changes, also a decision
that would have shrunk a layer with float state before reaching the quantized one."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear, configure_model, lora_layers
from lorambo.allocation.alora import alora_round
from lorambo.nn import keep_components_many


class EightBitMomentum(torch.optim.Optimizer):
    """Momentum SGD storing its buffer as bitsandbytes does for parameters of at least
    ``min_8bit_size`` elements: uint8 codes (code 0 decodes to -1) times one scale per block
    (here one block per parameter), starting from zero codes and a zero scale."""

    QMAP = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)

    def __init__(self, params, lr: float, min_8bit_size: int):
        super().__init__(params, dict(lr=lr))
        self.min_8bit_size = min_8bit_size

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if p.numel() < self.min_8bit_size:
                    buf = state.setdefault("momentum", torch.zeros_like(p)).mul_(0.9).add_(p.grad)
                else:
                    if not state:
                        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["absmax1"] = torch.zeros(1, dtype=torch.float64)
                    buf = (self.QMAP[state["state1"].long()] * state["absmax1"]).mul(0.9).add(p.grad)
                    scale = buf.abs().max().clamp_min(1e-12)
                    state["absmax1"].fill_(scale)
                    state["state1"].copy_(((buf / scale + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
                p.add_(buf, alpha=-group["lr"])


def _trained(sizes=((6, 8),), rank=3, min_8bit_size=0):
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[nn.Linear(i, o, dtype=torch.float64) for i, o in sizes])
    configure_model(model, rank, capacity=4)
    layers = list(lora_layers(model).values())
    for layer in layers:
        with torch.no_grad():
            layer.lora_B[:, :rank].copy_(torch.randn(layer.out_features, rank, dtype=torch.float64, generator=gen))
    opt = EightBitMomentum([p for layer in layers for p in (layer.lora_A, layer.lora_B)], lr=1e-3,
                           min_8bit_size=min_8bit_size)
    x = torch.randn(5, sizes[0][0], dtype=torch.float64, generator=gen)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    return model, layers, opt


def _snapshot(layers, opt):
    return ([layer.rank for layer in layers],
            [t.clone() for layer in layers for t in (layer.lora_A.detach(), layer.lora_B.detach(),
                                                     layer.lora_A.grad, layer.lora_B.grad)],
            [v.clone() for layer in layers for p in (layer.lora_A, layer.lora_B) for v in opt.state[p].values()])


def _same(a, b):
    return a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1] + a[2], b[1] + b[2]))


CHANGES = {
    "set_rank shrink": lambda model, layer, opt: layer.set_rank(1, optimizer=opt),
    "set_rank grow": lambda model, layer, opt: layer.set_rank(4, optimizer=opt),
    "keep_components": lambda model, layer, opt: layer.keep_components([2, 0], optimizer=opt),
    "keep_components_many": lambda model, layer, opt: keep_components_many([(layer, [2, 0])], opt),
    "configure_model": lambda model, layer, opt: configure_model(model, {"0": 2}, optimizer=opt),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_rank_changes_refuse_quantized_state_and_change_nothing(change):
    model, layers, opt = _trained()
    assert opt.state[layers[0].lora_A]["state1"].dtype == torch.uint8
    before = _snapshot(layers, opt)
    with pytest.raises(RuntimeError, match=r"LoRAMBoLinear '0': .*EightBitMomentum holds its state 'state1' for the "
                                           r"LoRA pools as torch\.uint8 \(quantized\).*nothing was changed"):
        CHANGES[change](model, layers[0], opt)
    assert _same(_snapshot(layers, opt), before)


def test_a_decision_is_refused_before_it_shrinks_a_layer_with_float_state():
    # layer "0" (6 -> 8: pools of 24 and 32 elements) keeps float state, layer "1" (8 -> 40: 32 and
    # 160 elements) is quantized; the round would move a component from "0" to "1"
    model, layers, opt = _trained(sizes=((6, 8), (8, 40)), min_8bit_size=100)
    assert opt.state[layers[0].lora_B]["momentum"].dtype == torch.float64
    assert opt.state[layers[1].lora_B]["state1"].dtype == torch.uint8
    before = _snapshot(layers, opt)
    scores = {"0": torch.tensor([0.1, 5.0, 6.0]), "1": torch.tensor([7.0, 8.0, 9.0])}
    with pytest.raises(RuntimeError, match=r"LoRAMBoLinear '1': .*'state1'"):
        alora_round(model, {"0": layers[0], "1": layers[1]}, None, None, n_prune=1, optimizer=opt, scores=scores)
    assert _same(_snapshot(layers, opt), before)


def test_a_growth_decision_is_refused_before_it_grows_a_layer_with_float_state():
    from lorambo.allocation.online import OnlineGrowth

    model, layers, opt = _trained(sizes=((6, 8), (8, 40)), min_8bit_size=100)
    growth = OnlineGrowth({"0": layers[0], "1": layers[1]}, budget=10_000)
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with growth.capture:
        model(x).square().sum().backward()
    before = _snapshot(layers, opt)
    with pytest.raises(RuntimeError, match=r"LoRAMBoLinear '1': .*'state1'"):
        growth.update(step=0, optimizer=opt)
    assert _same(_snapshot(layers, opt), before)
    assert growth.capture.has_data()  # the captured step is kept for a retry


def test_keeping_every_slot_in_place_is_no_change_and_not_refused():
    model, layers, opt = _trained()
    before = _snapshot(layers, opt)
    layers[0].keep_components([0, 1, 2], optimizer=opt)
    keep_components_many([(layers[0], [0, 1, 2])], opt)
    layers[0].set_rank(3, optimizer=opt)
    assert _same(_snapshot(layers, opt), before)

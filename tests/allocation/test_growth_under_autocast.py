"""A growth decision taken under autocast (opt.step(step) inside the training step's autocast
block) computes its products in float32 all the same. Before, the power iteration and the
new rows' activation scale ran their matmuls in bfloat16: gains 1.2e-3 off float64. Against
float64 computations on the same captured X and dY."""

import torch

from lorambo import LoRAMBoLinear
from lorambo.allocation.online import grow_layer, layer_benefits_many


def _layer_and_pairs():
    torch.manual_seed(0)
    layer = LoRAMBoLinear(torch.nn.Linear(12, 10), rank=2, capacity=8)
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(64, 12, generator=gen) + 0.5, torch.randn(64, 10, generator=gen)) for _ in range(3)]
    return layer, pairs


def test_gains_under_autocast_are_the_float64_singular_values():
    layer, pairs = _layer_and_pairs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gains, _ = layer_benefits_many({"l": layer}, {"l": pairs}, {"l": 3}, 4, 4, 0, 0, {"l": 0})
    g = sum(dy.double().T @ x.double() for x, dy in pairs)                     # (out, in)
    qa = torch.linalg.qr(layer.lora_A[:2].detach().double().T).Q              # span of A's rows
    qb = torch.linalg.qr(layer.lora_B[:, :2].detach().double()).Q             # span of B's columns
    g_perp = (g - qb @ (qb.T @ g)) - (g - qb @ (qb.T @ g)) @ qa @ qa.T
    want = torch.linalg.svdvals(g_perp)[:3]
    torch.testing.assert_close(torch.as_tensor(gains["l"], dtype=torch.float64), want, rtol=1e-5, atol=0)


def test_new_rows_under_autocast_get_the_float64_activation_scale():
    layer, pairs = _layer_and_pairs()
    inputs = [x for x, _ in pairs]
    directions = torch.randn(12, 2, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grow_layer(layer, 4, directions, generator=torch.Generator().manual_seed(3), inputs=inputs)
    grown = layer.lora_A[2:4].detach().double()
    # the rows of a plain growth with that generator: Kaiming rows, whose norms the new rows keep
    plain = LoRAMBoLinear(torch.nn.Linear(12, 10), rank=2, capacity=8)
    plain.set_rank(4, generator=torch.Generator().manual_seed(3))
    norms = plain.lora_A[2:4].detach().double().norm(dim=1, keepdim=True)
    d = directions.double().T
    d = d / d.norm(dim=1, keepdim=True)
    x = torch.cat(inputs).double()
    along = (x @ d.T).square().sum(0)                                          # sum_t (d_j . x_t)^2
    random = x.square().sum() / x.shape[1]
    want = d * norms * (random / along).sqrt().unsqueeze(1)
    torch.testing.assert_close(grown, want, rtol=1e-5, atol=0)

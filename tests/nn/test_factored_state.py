"""torch.optim.Adafactor keeps factored second moments: ``row_var`` of ``lora_A`` [capacity, 1] and
``col_var`` of ``lora_B`` [1, capacity] hold one entry per slot and must move, and reset, with
their slots; the other factors ([1, in] of A, [out, 1] of B) are shared by all slots. The
compiled remap is checked against the per-layer path in test_pool_ops.py."""

import copy

import pytest
import torch
from torch.optim import Adafactor  # torch >= 2.5; lorambo needs >= 2.11

from lorambo import LoRAMBoLinear


def _trained(rank=4, capacity=6, steps=3, seed=0):
    """Trained at full capacity (Adafactor refuses padded pools), then shrunk to ``rank``."""
    gen = torch.Generator().manual_seed(seed)
    layer = LoRAMBoLinear(torch.nn.Linear(9, 7, dtype=torch.float64), rank=capacity, capacity=capacity)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    opt = Adafactor(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(5, 9, generator=gen, dtype=torch.float64)).square().sum().backward()
        opt.step()
    layer.set_rank(rank, optimizer=opt)
    return layer, opt


def _factors(layer, opt):
    a, b = opt.state[layer.lora_A], opt.state[layer.lora_B]
    return (a["row_var"].clone(), a["col_var"].clone(), b["row_var"].clone(), b["col_var"].clone())


def test_factored_moments_move_with_their_slots(backend):
    layer, opt = _trained()
    a_rows, a_cols, b_rows, b_cols = _factors(layer, opt)
    assert a_rows.shape == (6, 1) and b_cols.shape == (1, 6) and a_rows[:4].gt(0).all()  # the case tested
    keep = [3, 0, 2]
    layer.keep_components(keep, opt)
    got = _factors(layer, opt)
    torch.testing.assert_close(got[0][:3], a_rows[keep], rtol=0, atol=0)
    torch.testing.assert_close(got[3][:, :3], b_cols[:, keep], rtol=0, atol=0)
    assert not got[0][3:].any() and not got[3][:, 3:].any()  # dropped slot 1's statistics are gone
    torch.testing.assert_close(got[1], a_cols, rtol=0, atol=0)  # shared factors: untouched
    torch.testing.assert_close(got[2], b_rows, rtol=0, atol=0)


def test_grown_slots_start_with_empty_statistics():
    layer, opt = _trained(rank=2, capacity=6)
    with torch.no_grad():  # stale statistics in an inactive slot, as an earlier shrink could leave
        opt.state[layer.lora_A]["row_var"][3] = 5.0
        opt.state[layer.lora_B]["col_var"][:, 3] = 5.0
    with pytest.warns(UserWarning, match="Adafactor keeps one step count per parameter"):
        layer.set_rank(4, optimizer=opt)
    a_rows, _, _, b_cols = _factors(layer, opt)
    assert a_rows[:2].gt(0).all() and not a_rows[2:4].any() and not b_cols[:, 2:4].any()



def test_adafactor_refuses_to_step_a_pool_below_capacity():
    """Its step is scaled by the RMS of the whole parameter and update, inactive zeros included,
    so at rank 3 of capacity 5 it is not Adafactor on a rank-3 module built afresh (shown on
    untagged copies of the pools): it raises, naming the optimizer, before changing anything;
    at full capacity it steps as usual."""
    torch.manual_seed(0)
    padded = LoRAMBoLinear(torch.nn.Linear(6, 5, dtype=torch.float64), rank=3, capacity=5)
    with torch.no_grad():
        padded.lora_B[:, :3].normal_()
    fresh = LoRAMBoLinear(copy.deepcopy(padded.base_layer), rank=3, capacity=3)
    with torch.no_grad():
        fresh.lora_A.copy_(padded.lora_A[:3])
        fresh.lora_B.copy_(padded.lora_B[:, :3])
    x = torch.randn(7, 6, dtype=torch.float64)
    padded(x).square().sum().backward()
    fresh(x).square().sum().backward()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in (padded.lora_A, padded.lora_B)]
    for c, p in zip(copies, (padded.lora_A, padded.lora_B)):
        c.grad = p.grad.clone()
    Adafactor(copies, lr=1e-2).step()
    Adafactor(fresh.parameters(), lr=1e-2).step()  # full capacity: nothing refused
    gap = (copies[0][:3] - fresh.lora_A).abs().max()
    assert gap > 1e-4, gap  # why it is refused: the padded update is another one
    before = [p.detach().clone() for p in (padded.lora_A, padded.lora_B)]
    with pytest.raises(RuntimeError, match=r"torch\.optim\.Adafactor cannot train a LoRAMBoLinear pool below "
                                           r"its capacity \(a pool at rank 3 of capacity 5, shape \(5, 6\)\)"):
        Adafactor(padded.parameters(), lr=1e-2).step()
    assert all(torch.equal(p, b) for p, b in zip((padded.lora_A, padded.lora_B), before))

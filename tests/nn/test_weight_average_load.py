"""A weight average (torch.optim.swa_utils.AveragedModel, an EMA) copied before a rank change keeps
the old rank and averages the grown slots into its inactive ones. Loading its state_dict used to
bring back the old rank and zero those slots silently; it is refused naming the layer, the pool
and the ranks, before anything changes. An average taken after the last rank change loads as the
average a float64 EMA computed by hand gives."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import lorambo
from lorambo import LoRAMBoLinear

DT = torch.float64
DECAY = 0.9

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), 2, capacity=4, name="fc"))


def _train(model, optimizer, average, steps, gen, by_hand=None):
    for _ in range(steps):
        model(torch.randn(8, 6, generator=gen, dtype=DT)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        average.update_parameters(model)
        if by_hand is not None:  # EMA: the first update copies, later ones blend
            for name, value in model.state_dict().items():
                if name.endswith("lora_A") or name.endswith("lora_B"):
                    old = by_hand.get(name)
                    by_hand[name] = value.clone() if old is None else DECAY * old + (1 - DECAY) * value


def test_an_average_copied_before_growth_is_refused_on_load():
    model = _model()
    optimizer = lorambo.optim.AdamW(model.parameters(), lr=0.1)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    gen = torch.Generator().manual_seed(1)
    _train(model, optimizer, ema, 2, gen)
    model[0].set_rank(3, optimizer=optimizer)
    _train(model, optimizer, ema, 2, gen)
    assert ema.module[0].rank == 2 and ema.module[0].lora_A[2].abs().max() > 0.01  # the stale copy
    target = _model()
    target[0].set_rank(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"LoRAMBoLinear 'fc': state_dict entry '0.lora_A' has non-zero slots up "
                                         r"to 3 but its saved rank \('0._extra_state'\) is 2"):
        target.load_state_dict(ema.module.state_dict())
    assert target[0].rank == 1
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_an_average_taken_after_the_last_rank_change_loads():
    model = _model()
    optimizer = lorambo.optim.AdamW(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    _train(model, optimizer, AveragedModel(model), 2, gen)
    model[0].set_rank(3, optimizer=optimizer)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))  # copied at rank 3
    by_hand = {}
    _train(model, optimizer, ema, 3, gen, by_hand)
    target = _model()
    target.load_state_dict(ema.module.state_dict())
    assert target[0].rank == 3
    for name, value in by_hand.items():
        torch.testing.assert_close(target.state_dict()[name], value, rtol=1e-12, atol=1e-14, msg=name)
    x = torch.randn(4, 6, generator=gen, dtype=DT)
    pools = {k.split(".")[-1]: v for k, v in by_hand.items()}
    want = x @ target[0].weight.T + target[0].bias + target[0].scaling * (x @ pools["lora_A"][:3].T) @ pools["lora_B"][:, :3].T
    torch.testing.assert_close(target(x), want, rtol=1e-12, atol=1e-12)

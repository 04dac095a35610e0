"""lorambo.optim.AdamW.load_state_dict of a float16 model added an empty state entry for every
float16 parameter the checkpoint held no state for (a rank-0 pool, a parameter that got no
gradient yet): its float32 moment copies were made for every such parameter, and writing them
back into ``self.state`` (a defaultdict) created ``{}``. The resumed optimizer's state_dict then
differed from the uninterrupted one's, and a parameter that never stepped looked stepped."""

import io

import torch
from torch import nn

import lorambo


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Linear(4, 3))
    lorambo.configure_model(model, {"0": 2, "2": 0}, capacity=4, modules_to_save=["3"])  # "2": rank 0
    return model.half()


def _step(model, opt, seed, head=True):
    g = torch.Generator().manual_seed(seed)
    out = model[2](model[1](model[0](torch.randn(5, 6, generator=g).half())))
    (model[3](out) if head else out).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_loading_adds_no_state_for_parameters_that_have_none():
    model = _model()
    opt = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _step(model, opt, 0, head=False)  # the head gets no gradient: no state yet
    want = opt.state_dict()
    assert len(want["state"]) == 2  # layer "0"'s pools; rank-0 pools and the head have none
    buf = io.BytesIO()
    torch.save(want, buf)
    buf.seek(0)

    fresh = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    got = fresh.state_dict()
    assert got["state"].keys() == want["state"].keys()
    for pid, entry in want["state"].items():
        assert entry.keys() == got["state"][pid].keys()
        for key, value in entry.items():
            assert torch.equal(got["state"][pid][key], value), (pid, key)
            assert got["state"][pid][key].dtype == value.dtype, (pid, key)  # moments stay float32

"""Compiled autograd (``torch._dynamo.config.compiled_autograd = True``) over rank changes.

Compiled autograd compiles the backward of the whole step itself and passes the saved sizes 0
and 1 as constants, so each layer's rank is specialised on 0 and 1 there: a new mixture of
layers at ranks 0, 1 and >= 2 recompiles the backward, and past the recompile limit it runs
uncompiled (docs/backends.md, *Compiled autograd*, documents this). Whatever it compiles, the
gradients must be those of the model: each step's are compared with the eager backward of the
same model in float64, over mixtures of ranks 0, 1 and larger, past the recompile limit.
"""

import random

import pytest
import torch
from torch import nn

import lorambo


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_autograd_gradients_follow_every_rank_mixture():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    lorambo.configure_model(net, 2, capacity=4)
    layers = list(lorambo.lora_layers(net).values())
    params = [p for p in net.parameters() if p.requires_grad]

    data, ranks = torch.Generator().manual_seed(1), random.Random(2)
    # 0/1 mixtures first: past the recompile limit of 2, the later steps run the uncompiled backward
    mixtures = [[0, 1, 2], [1, 0, 3], [2, 2, 2], [0, 0, 1]] + [[ranks.randint(0, 4) for _ in layers]
                                                                for _ in range(4)]
    # torch.compile reads the setting when it wraps the function
    torch._dynamo.config.compiled_autograd = True
    try:
        @torch.compile(backend="aot_eager")
        def train_step(x):
            loss = net(x).square().sum()
            loss.backward()
            return loss

        run_mixtures(train_step, net, layers, params, mixtures, data)
    finally:
        torch._dynamo.config.compiled_autograd = False
    assert torch._dynamo.utils.counters["compiled_autograd"]["captures"] >= 1  # it did compile the backward


def run_mixtures(train_step, net, layers, params, mixtures, data):
    with torch._dynamo.config.patch(recompile_limit=2):
        for mixture in mixtures:
            with torch.no_grad():
                for layer, rank in zip(layers, mixture):
                    layer.set_rank(rank)
                    layer.lora_B[:, :rank].normal_(generator=data)  # new slots start at B = 0: make them count
            x = torch.randn(5, 8, dtype=torch.float64, generator=data)
            for p in params:
                p.grad = None
            train_step(x)
            got = [p.grad for p in params]
            torch._dynamo.config.compiled_autograd = False
            want = torch.autograd.grad(net(x).square().sum(), params)
            torch._dynamo.config.compiled_autograd = True
            for i, (g, w) in enumerate(zip(got, want)):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"ranks {mixture}, parameter {i}\n{m}")

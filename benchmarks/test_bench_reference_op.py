"""CPU benchmark: lorambo's reference LoRA op vs a peft-style eager LoRA and the frozen layer.

Forward + backward of one linear layer with LoRA (input gradient included, base frozen),
float32 on CPU. ``pool`` is rank 16 active in a capacity-64 pool: it must cost what a dense
rank-16 layer costs, since padded slots are skipped. Run: ``make bench``.
"""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear
from providers import PeftStyleLoRA

M, K, N, RANK = 1024, 1024, 1024, 16


def _layers():
    """The layers, the same values on every run (seeded; the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _draw_layers()


def _draw_layers():
    base = nn.Linear(K, N)
    frozen = nn.Linear(K, N).requires_grad_(False)
    lorambo_pool = LoRAMBoLinear(nn.Linear(K, N), rank=RANK, capacity=64)
    lorambo_dense = LoRAMBoLinear(nn.Linear(K, N), rank=RANK, capacity=RANK)
    for layer in (lorambo_pool, lorambo_dense):
        with torch.no_grad():
            layer.lora_B[:, :RANK].normal_(std=0.01)
    del base
    return {"frozen_linear": frozen, "peft_style_eager": PeftStyleLoRA(nn.Linear(K, N), RANK, scaling=1.0),
            "lorambo_rank16_cap64": lorambo_pool, "lorambo_rank16_cap16": lorambo_dense}


LAYERS = _layers()


def _inputs(mode):
    """(x, output gradient): the same values for every provider and run (seeded)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).requires_grad_(mode == "fwd_bwd")
    return x, torch.randn(M, N, generator=gen)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(LAYERS))
def test_lora_linear_cpu(benchmark, provider, mode):
    layer = LAYERS[provider]
    x, grad = _inputs(mode)
    benchmark.group = f"cpu fp32 M={M} K={K} N={N} r={RANK} {mode}"
    benchmark.extra_info.update(provider=provider, mode=mode, threads=torch.get_num_threads(),
                                torch=torch.__version__)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return layer(x)
    else:
        def run():
            y = layer(x)
            y.backward(grad)
            x.grad = None
            for p in layer.parameters():
                p.grad = None

    benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=1)

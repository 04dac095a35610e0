"""CPU benchmark: one optimizer step over MiniLM-shaped LoRA pools.

36 pools (384 -> 384 and 384 <-> 1536, as in MiniLM's attention and MLP), rank 8 active in a
capacity-32 pool, float32, bfloat16 and float16. ``torch_adamw`` updates whole pools (it cannot know which slots are
active); ``lorambo_adamw`` updates only the active slots with per-slot bias correction, in one
call of the compiled extension (its CPU path); ``lorambo_adamw_foreach`` is the same update as
torch._foreach ops (the path for CUDA and FSDP2 shards, forced here with the ``torch``
backend); ``torch_adamw_dense`` is torch's AdamW on capacity-8 pools, the cost a rank-8 adapter
should have.
Run: ``make bench``.
"""

import pytest
import torch
from torch import nn

import lorambo

RANK, CAPACITY = 8, 32
SHAPES = [(384, 384)] * 24 + [(384, 1536)] * 6 + [(1536, 384)] * 6  # (in, out) of 36 adapted layers


def _pools(capacity, dtype):
    """The pools with gradients, the same values on every run (seeded; the global generator is
    left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = [lorambo.LoRAMBoLinear(nn.Linear(i, o, dtype=dtype), rank=RANK, capacity=capacity)
                  for i, o in SHAPES]
        params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
        for p in params:
            p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("provider", ["torch_adamw", "lorambo_adamw", "lorambo_adamw_foreach", "torch_adamw_dense"])
def test_optimizer_step(benchmark, provider, dtype):
    torch.set_num_threads(1)
    if provider == "lorambo_adamw":
        assert lorambo.ext.available(), "the compiled extension is not built"
    lorambo.set_backend("torch" if provider == "lorambo_adamw_foreach" else None)
    try:
        params = _pools(RANK if provider == "torch_adamw_dense" else CAPACITY, dtype)
        cls = lorambo.optim.AdamW if provider.startswith("lorambo") else torch.optim.AdamW
        opt = cls(params, lr=1e-3)
        opt.step()  # state allocated outside the timing
        benchmark(opt.step)
    finally:
        lorambo.set_backend(None)

"""A tiny float64 GPT-2 whose ``lm_head`` and ``wte`` share one weight, for the tests of modules
to save whose weight is tied elsewhere."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

WEIGHT = {"lm_head": "lm_head.weight", "wte": "transformer.wte.weight"}  # the tied weight's name by module
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))  # token ids within its vocabulary


def tied_gpt2() -> GPT2LMHeadModel:
    """The same model on every call (seed 0), in eval mode with dropout off."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model

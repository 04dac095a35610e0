"""repr(LoRAMBoLinear) shows the layer's settings and state, and never raises: not on meta
tensors, merged, at rank 0, nor for a layer whose constructor failed half-way (what a debugger
or a traceback's locals show)."""

import torch
from torch import nn

from lorambo import LoRAMBoLinear

SETTINGS = "in_features=8, out_features=6, rank={rank}, capacity=6, scaling=1, dropout=0.0, rslora=False, base=linear"


def test_repr_on_meta_merged_and_rank_zero():
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = LoRAMBoLinear(nn.Linear(8, 6), rank=2)
    merged = LoRAMBoLinear(nn.Linear(8, 6), rank=2)
    merged.merge()
    zero = LoRAMBoLinear(nn.Linear(8, 6), rank=0, alpha=1.0)
    assert SETTINGS.format(rank=2) + ", merged=False" in repr(meta)
    assert SETTINGS.format(rank=2) + ", merged=True" in repr(merged)
    assert SETTINGS.format(rank=0) + ", merged=False" in repr(zero)


def test_repr_of_a_half_built_layer_does_not_raise():
    half = LoRAMBoLinear.__new__(LoRAMBoLinear)
    nn.Module.__init__(half)  # the constructor stopped right after nn.Module's
    assert repr(half) == ("LoRAMBoLinear(in_features=None, out_features=None, rank=None, capacity=None, "
                          "scaling=None, dropout=None, rslora=None, base=None, merged=None)")

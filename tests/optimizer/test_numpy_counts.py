"""Counts given as numpy integers (e.g. read from an array of settings) are accepted like ints,
and non-integral or negative ones are still refused."""

import numpy as np
import pytest
import torch
from torch import nn

from lorambo.allocation.alora import ALoRAConfig
from lorambo.allocation.online import ActivationCapture
from lorambo.sensitivity import FisherProxy


def test_alora_config_takes_numpy_integers_as_ints():
    cfg = ALoRAConfig(k1=np.int64(2), k2=np.int32(3), rounds=np.int64(2), n_prune=np.int64(1))
    assert cfg.decision_steps() == [2, 5] and all(type(v) is int for v in (cfg.k1, cfg.k2, cfg.rounds))
    with pytest.raises(ValueError, match="ALoRAConfig.k2 must be an int >= 1, got 2.5"):
        ALoRAConfig(k2=2.5)


def test_fisher_sketch_dim_and_capture_max_tokens_take_numpy_integers():
    model = nn.Sequential(nn.Linear(4, 3))
    assert FisherProxy(model, sketch_dim=np.int64(2)).sketch_dim == 2
    with pytest.raises(ValueError, match="sketch_dim must be a positive int"):
        FisherProxy(model, sketch_dim=np.float64(2.0))
    capture = ActivationCapture({"0": model[0]}, max_tokens=np.int64(3))
    with capture:
        model(torch.randn(7, 4, requires_grad=True)).sum().backward()
    assert capture.max_tokens == 3 and capture.pairs("0")[0][0].shape == (3, 4)
    with pytest.raises(ValueError, match=r"max_tokens=np.int64\(0\) must be an int >= 1"):
        ActivationCapture({"0": model[0]}, max_tokens=np.int64(0))

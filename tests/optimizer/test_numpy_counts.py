"""Counts given as numpy integers (e.g. read from an array of settings) are accepted like ints,
and non-integral or negative ones are still refused."""

import re

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
    # repr: np.int64(0) under numpy 2, 0 under numpy 1 (pyproject allows numpy >= 1.24)
    with pytest.raises(ValueError, match=re.escape(f"max_tokens={np.int64(0)!r} must be an int >= 1")):
        ActivationCapture({"0": model[0]}, max_tokens=np.int64(0))


def _grown_with_steps(steps):
    from lorambo.optimizer import LoRAMBoOptimizer
    from residual_net import ResidualNet, mse

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randn(12, 8, generator=g, dtype=torch.float64))
            for _ in range(len(steps))]
    torch.manual_seed(0)
    model = ResidualNet()
    opt = LoRAMBoOptimizer(model, 500, sensitivity_method="gradient", initial_budget=300, warmup_steps=2,
                           interval=3, sketch_rank=1)
    opt.compute_optimal_ranks(data[:2], mse)
    opt.configure()
    torch_opt = opt.make_optimizer(lr=2e-2)
    for step in steps:
        with opt.capture(step):
            mse(model, data[int(step)]).backward()
        opt.step(step)
        torch_opt.step()
        torch_opt.zero_grad()
    return model, opt


@pytest.mark.usefixtures("one_thread")
def test_numpy_steps_grow_the_rows_int_steps_grow():
    """The decision generators are keyed by the step: np.int64(5), whose repr is not '5', drew
    other sketches and other new rows than 5 (same ranks, other weights)."""
    model, opt = _grown_with_steps(range(8))
    np_model, np_opt = _grown_with_steps(np.arange(8))
    assert any(r["event"] == "grow" for r in opt.decisions)
    assert np_opt.current_ranks() == opt.current_ranks()
    for (name, p), (_, q) in zip(model.named_parameters(), np_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_decision_generator_counts_integer_keys_by_value():
    from lorambo.distributed import decision_generator

    want = torch.rand(5, generator=decision_generator(3, "grow", 5, 1), dtype=torch.float64)
    got = torch.rand(5, generator=decision_generator(np.int64(3), "grow", np.int64(5), np.int32(1)),
                     dtype=torch.float64)
    assert torch.equal(got, want)
    other = torch.rand(5, generator=decision_generator(3, "grow", 6, 1), dtype=torch.float64)
    assert not torch.equal(other, want)

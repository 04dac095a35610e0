"""Every method trains the same kind of parameters: its LoRA factors, nothing else."""

import pytest

from lorambo.experiments.config import METHODS, REFERENCE
from lorambo.experiments.methods import RunContext, budget_of, compute_sensitivities
from lorambo.experiments.registry import make_method

pytestmark = pytest.mark.slow

ALLOCATORS = tuple(m for m in METHODS if m not in REFERENCE)  # the oracle needs the planted task


def test_sentiment_head_stays_frozen_for_every_method(sentiment_task, tiny_cfg):
    """The classification head is the linear probe's for every method: a method that also trained
    it (770 parameters) would get more than the budget P and a different model than the others."""
    cfg = tiny_cfg
    batches = sentiment_task.train_batches(0, cfg.steps, cfg.batch_size)
    calib = batches[:cfg.calib_batches]
    sens, _ = compute_sensitivities(sentiment_task, cfg, 0, calib, ALLOCATORS, stream=batches)
    level = 1.0
    ctx = RunContext(sentiment_task, cfg, level, budget_of(level, sentiment_task.dims), 0, calib,
                     sentiment_task.heldout_batches(cfg.alora_heldout), sens)
    head_numel = sum(p.numel() for p in sentiment_task.head.parameters())
    assert head_numel == 384 * 2 + 2
    for method in ALLOCATORS:
        model = make_method(method, ctx).setup(sentiment_task.fresh_student(0))
        names = {n for n, _ in model.named_parameters()}
        assert any(n.endswith("head.weight") for n in names), method
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained, method
        assert [n for n in trained if ".lora_" not in n] == [], method

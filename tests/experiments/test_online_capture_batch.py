"""The online-growth method hands each training batch to ``LoRAMBoOptimizer.capture``, so the
captured X and dY hold real tokens only (the sentiment task pads its sentences to max_length)."""

import pytest

from lorambo.experiments.methods import RunContext, budget_of, compute_sensitivities
from lorambo.experiments.train import train_run
from lorambo.optimizer import LoRAMBoOptimizer

pytestmark = pytest.mark.slow


def test_online_capture_gets_the_padded_training_batch(sentiment_task, tiny_cfg, monkeypatch):
    cfg = tiny_cfg
    batches = sentiment_task.train_batches(0, cfg.steps, cfg.batch_size)
    assert all("attention_mask" in b for b in batches)  # what LoRAMBoOptimizer's token_mask reads
    calib = batches[:cfg.calib_batches]
    sens, _ = compute_sensitivities(sentiment_task, cfg, 0, calib, ("online",), stream=batches)
    ctx = RunContext(sentiment_task, cfg, 1.0, budget_of(1.0, sentiment_task.dims), 0, calib,
                     sentiment_task.heldout_batches(cfg.alora_heldout), sens)
    seen = []
    capture = LoRAMBoOptimizer.capture

    def spy(self, step, batch=None):
        seen.append((step, batch))
        return capture(self, step, batch)

    monkeypatch.setattr(LoRAMBoOptimizer, "capture", spy)
    train_run(ctx, "online", cfg.lr_grid[0], batches, score_val=False)
    assert [step for step, _ in seen] == list(range(len(batches)))
    assert all(batch is given for (_, batch), given in zip(seen, batches))

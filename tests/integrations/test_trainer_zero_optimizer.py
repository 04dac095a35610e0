"""LoRAMBoCallback reads the optimizer behind every wrapper, as the rank changes do
(lorambo/nn/optimizer_argument.py): accelerate's ``.optimizer`` and torch's
``ZeroRedundancyOptimizer``'s ``.optim``. Given ``Trainer(optimizers=(ZeroRedundancyOptimizer(
params, optimizer_class=torch.optim.Adam), None))``, which Trainer hands callbacks inside an
``AcceleratedOptimizer``, it sees the Adam and warns that grown slots would take oversized Adam
steps; behind the same wrappers lorambo.optim.AdamW gets no warning."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoOptimizer
from lorambo.integrations.trainer import LoRAMBoCallback

pytest.importorskip("transformers")


@pytest.mark.usefixtures("one_process_group", "accelerator")
@pytest.mark.parametrize("inner,warns", [(torch.optim.Adam, True), (lorambo.optim.AdamW, False)],
                         ids=["torch-adam", "lorambo-adamw"])
def test_the_callback_reads_the_optimizer_behind_accelerate_and_zero(inner, warns):
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4)), 1, capacity=4)
    callback = LoRAMBoCallback(LoRAMBoOptimizer(model, total_budget=100, warmup_steps=0, interval=1, sketch_rank=2))
    zero = ZeroRedundancyOptimizer([p for p in model.parameters() if p.requires_grad], optimizer_class=inner,
                                   lr=1e-2)
    handed = AcceleratedOptimizer(zero, device_placement=False)  # what Trainer gives callbacks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_begin(None, SimpleNamespace(global_step=0), None, optimizer=handed)
    said = [str(w.message) for w in caught if "oversized first steps" in str(w.message)]
    assert len(said) == warns
    if warns:
        assert said[0].startswith("LoRAMBoCallback: Trainer's optimizer is Adam")

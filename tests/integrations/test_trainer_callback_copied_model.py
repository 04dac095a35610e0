"""A model copied during a Trainer decision step (an EMA or teacher made by deepcopy, a
torch.save of the whole model) is copied (LoRAMBoCallback's batch hook is no lambda, which would
not pickle), computes as the model did at the copy, and its later forwards arm none of the
allocator's capture hooks on the original model: a copy that kept the hook would arm them at
steps that decide nothing, and each such step would keep every layer's input and output gradient
until the optimizer step."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.optimizer import LoRAMBoOptimizer  # noqa: E402

from model_copies import COPIER_IDS, COPIERS  # noqa: E402
from residual_net import ResidualNet, mse  # noqa: E402

DT = torch.float64


def _armed(model) -> bool:
    return any(layer._forward_hooks for layer in lorambo.lora_layers(model).values())


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_a_copy_made_in_a_decision_step_does_not_arm_the_capture_later(copier):
    torch.manual_seed(0)
    model = ResidualNet()
    lorambo.configure_model(model, 1, capacity=4)
    allocator = LoRAMBoOptimizer(model, total_budget=10_000, warmup_steps=0, interval=2, sketch_rank=2)
    optimizer = allocator.make_optimizer(lr=1e-2)
    callback = LoRAMBoCallback(allocator)
    args = SimpleNamespace(output_dir="unused", should_save=False)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 8, dtype=DT, generator=gen), torch.randn(6, 8, dtype=DT, generator=gen)
    twin = None
    for step in range(2):  # step 0 decides, step 1 does not
        state = SimpleNamespace(global_step=step)
        callback.on_step_begin(args, state, None)
        if twin is None:
            twin = copier(model)  # made while step 0's hooks are on the model
        with torch.no_grad():  # an EMA's forward: the copy computes as the model did at the copy
            out = twin(x)
            if step == 0:
                torch.testing.assert_close(out, model(x), rtol=0, atol=0)
        assert _armed(model) == (step == 0), step  # the copy's forward armed nothing at step 1
        mse(model, (x, y)).backward()
        callback.on_pre_optimizer_step(args, state, None, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
    assert callback.decisions and {r["step"] for r in callback.decisions} == {0}

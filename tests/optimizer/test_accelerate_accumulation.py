"""Online growth in a plain accelerate loop with gradient accumulation.

accelerate's idiom calls ``optimizer.step()`` on every micro-batch inside
``accelerator.accumulate(model)``; the optimizer ``accelerator.prepare`` returned steps only on
the micro-batch that ends the accumulation (``accelerator.sync_gradients``). ``opt.step(step,
optimizer=prepared)`` placed beside it waits for the micro-batch that steps (rather than deciding
on the first micro-batch from half the step's gradients, then again on the next one), so the
loop decides and trains as a plain loop that accumulates by hand and calls ``opt.step`` once."""

import pytest
import torch
from torch import nn

from lorambo.integrations import fsdp
from lorambo.optimizer import LoRAMBoOptimizer

accelerate = pytest.importorskip("accelerate")

DT = torch.float64
ACCUMULATE = 2
MICRO_BATCHES = 6  # 3 optimizer steps: decisions at steps 1 and 2


@pytest.fixture
def clean_accelerate_state():
    """accelerate's process-wide state, reset before (an earlier Accelerator's accumulation steps
    would be kept) and after the test."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def _run(with_accelerate: bool, call: str = "step"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 8, dtype=DT), nn.Tanh(),
                          nn.Linear(8, 3, dtype=DT))
    alloc = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                             capacity=8, warmup_steps=1, interval=1, stop_step=3, sketch_rank=1)
    alloc.configure({"0": 1, "2": 1})
    optimizer = alloc.make_optimizer(lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(12, 8, dtype=DT, generator=gen), torch.randn(12, 3, dtype=DT, generator=gen))
               for _ in range(MICRO_BATCHES)]
    if with_accelerate:
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
        model, optimizer = accelerator.prepare(model, optimizer)
    for i, (x, y) in enumerate(batches):
        step = i // ACCUMULATE
        if with_accelerate:  # every call on every micro-batch, as accelerate's examples do
            with accelerator.accumulate(model):
                with alloc.capture(step):
                    accelerator.backward(((model(x) - y) ** 2).mean())
                if call == "step":
                    alloc.step(step, optimizer=optimizer)
                else:  # the FSDP2 entry point (here on a model that is not sharded)
                    fsdp.allocator_step(alloc, step, optimizer)
                optimizer.step()
                optimizer.zero_grad()
        else:  # accumulated by hand; one decision and one update per step
            with alloc.capture(step):
                (((model(x) - y) ** 2).mean() / ACCUMULATE).backward()
            if (i + 1) % ACCUMULATE == 0:
                alloc.step(step)
                optimizer.step()
                optimizer.zero_grad()
    decisions = [(r["step"], r["layer"], r["new_rank"], r["gains"]) for r in alloc.decisions]
    pools = {n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for n, layer in alloc.layers().items()}
    return decisions, pools


@pytest.mark.parametrize("call", ["step", "fsdp.allocator_step"])
def test_accumulating_micro_batches_decide_once_per_step_on_all_of_them(clean_accelerate_state, call):
    want_decisions, want_pools = _run(with_accelerate=False)
    assert [(s, n, r) for s, n, r, _ in want_decisions] == [(1, "0", 2), (1, "2", 2), (2, "0", 3), (2, "2", 3)]
    got_decisions, got_pools = _run(with_accelerate=True, call=call)
    assert [(s, n, r) for s, n, r, _ in got_decisions] == [(s, n, r) for s, n, r, _ in want_decisions]
    for (*_, got), (*_, want) in zip(got_decisions, want_decisions):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-12, atol=0)
    for name, (a, b) in want_pools.items():
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(got_pools[name][0], a, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got_pools[name][1], b, rtol=1e-12, atol=1e-15)

"""A plain accumulation loop that calls ``opt.step(step)`` after every micro-batch: the step's
decision is taken at the first call, and once it has changed ranks the later calls of that step
take none. Each call took another decision, from the micro-batches since the last one, so a
decision step grew ranks twice and spent its budget twice (ALoRA ran its round twice)."""

import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64
MICRO = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [[(torch.randn(24, 8, dtype=DT, generator=gen), torch.randn(24, 3, dtype=DT, generator=gen))
             for _ in range(MICRO)] for _ in range(3)]


def _train(step_after_every_micro_batch: bool):
    """Decisions at steps 0 and 2; ``False``: one call after the first micro-batch, the rest
    run uncaptured (the loop the repeated calls must equal)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 8, dtype=DT), nn.Tanh(),
                          nn.Linear(8, 3, dtype=DT))
    alloc = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                             capacity=8, interval=2, sketch_rank=2)
    alloc.configure({"0": 1, "2": 1})
    opt = alloc.make_optimizer(lr=1e-2)
    for step, micro_batches in enumerate(_batches()):
        for i, (x, y) in enumerate(micro_batches):
            if step_after_every_micro_batch or i == 0:
                with alloc.capture(step):
                    (((model(x) - y) ** 2).mean() / MICRO).backward()
                alloc.step(step)
                if i > 0:  # nothing is captured for a decision that is not taken
                    assert not alloc.online.capture.has_data()
            else:
                (((model(x) - y) ** 2).mean() / MICRO).backward()
        opt.step()
        opt.zero_grad()
    return alloc.decisions, {k: v.clone() for k, v in model.state_dict().items()}


def test_repeated_calls_of_a_decision_step_take_one_decision():
    want_decisions, want_state = _train(step_after_every_micro_batch=False)
    with pytest.warns(RuntimeWarning, match=r"step\(0\): step 0 has changed ranks already") as caught:
        got_decisions, got_state = _train(step_after_every_micro_batch=True)
    assert len([w for w in caught if "has changed ranks already" in str(w.message)]) == 1  # warned once
    assert {r["step"] for r in want_decisions} == {0, 2}
    assert got_decisions == want_decisions
    for key, value in want_state.items():
        torch.testing.assert_close(got_state[key], value, rtol=0, atol=0, msg=key)


def test_a_refused_decision_can_be_retried_at_the_same_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 3, dtype=DT))
    alloc = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                             capacity=3, interval=1, sketch_rank=2)
    alloc.configure({"0": 1, "2": 1})
    x, y = _batches()[0][0]
    with alloc.capture(0):
        ((model(x) - y) ** 2).mean().backward()
    lorambo.lora_layers(model)["0"].merge()
    with pytest.raises(RuntimeError, match="are merged"):
        alloc.step(0)
    lorambo.lora_layers(model)["0"].unmerge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already decided" warning: the refused call decided nothing
        assert alloc.step(0)


def test_alora_runs_one_round_per_decision_step():
    from lorambo.allocation.alora import ALoRAConfig

    from residual_net import ResidualNet, mse

    torch.manual_seed(0)
    model = ResidualNet(hidden=12)
    heldout = [(x, torch.randn(16, 8, dtype=DT)) for x in (torch.randn(16, 8, dtype=DT) for _ in range(2))]
    alloc = LoRAMBoOptimizer(model, 20 * 12, allocation="alora", loss_fn=mse, heldout_batches=heldout,
                             alora=ALoRAConfig(k1=0, k2=3, rounds=2, n_prune=2))
    alloc.compute_optimal_ranks()
    alloc.configure()
    first = alloc.step(0)
    assert first and alloc.alora_schedule().rounds_done == 1
    ranks = alloc.current_ranks()
    with pytest.warns(RuntimeWarning, match=r"step 0 has changed ranks already"):
        assert alloc.step(0) == []
    assert alloc.alora_schedule().rounds_done == 1 and alloc.current_ranks() == ranks
    assert alloc.decisions == first


def test_a_step_retried_after_loading_an_earlier_state_decides_again():
    """A loop that restores the model and the allocator saved before a decision step (an error
    after the decision, then a retry in the same process) takes that step's decision again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 3, dtype=DT))
    alloc = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                             capacity=3, interval=1, sketch_rank=2)
    alloc.configure({"0": 1, "2": 1})
    alloc.make_optimizer(lr=1e-2)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_alloc = alloc.state_dict()
    x, y = _batches()[0][0]

    def decide():
        with alloc.capture(0):
            ((model(x) - y) ** 2).mean().backward()
        records = alloc.step(0)
        model.zero_grad()
        return records, {k: v.clone() for k, v in model.state_dict().items()}

    first, grown = decide()
    assert first
    model.load_state_dict(saved_model)
    alloc.load_state_dict(saved_alloc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again, regrown = decide()
    assert again == first
    for key, value in grown.items():
        torch.testing.assert_close(regrown[key], value, rtol=0, atol=0, msg=key)


def test_a_step_repeated_after_an_overflow_decides_on_the_retry():
    """A loop that counts only the steps its GradScaler took repeats the step number after an
    overflow: the overflowed attempt's decision was skipped (not finite), so the retry decides."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 3, dtype=DT))
    alloc = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                             capacity=3, interval=1, sketch_rank=2)
    alloc.configure({"0": 1, "2": 1})
    x, y = _batches()[0][0]
    with alloc.capture(0):
        (((model(x) - y) ** 2).mean() * float("inf")).backward()
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert alloc.step(0) == []
    model.zero_grad()
    with alloc.capture(0):
        ((model(x) - y) ** 2).mean().backward()
    assert alloc.online.capture.has_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert alloc.step(0)

"""A plain accelerate loop (gradient accumulation, clipping, an LR schedule, online growth and rank
moves) checkpointed with ``accelerator.save_state`` after rank changes, the allocator registered
with ``accelerator.register_for_checkpointing``, and resumed by ``accelerator.load_state`` into
freshly configured objects (other ranks than the saved ones) continues as the run that never
stopped: the same decisions, ranks, pools, optimizer state and losses, bit for bit."""

import pytest
import torch

from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, mse

accelerate = pytest.importorskip("accelerate")

DT = torch.float64
ACCUMULATE = 2
MICRO_BATCHES, SAVE_AFTER = 14, 8  # 7 optimizer steps; saved after step 3, once ranks have changed

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 8, generator=g, dtype=DT), torch.randn(12, 8, generator=g, dtype=DT))
            for _ in range(MICRO_BATCHES + 2)]


DATA = _data()


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    yield reset
    reset()


def _start(reset_state):
    """Model, allocator and accelerate objects as a new process builds them (initial ranks)."""
    reset_state()
    torch.manual_seed(0)
    model = ResidualNet()
    alloc = LoRAMBoOptimizer(model, 500, sensitivity_method="gradient", initial_budget=300, warmup_steps=1,
                             interval=2, sketch_rank=1, move_threshold=1e3, heldout_batches=DATA[-2:], loss_fn=mse)
    alloc.compute_optimal_ranks(DATA[:2], mse)
    alloc.configure()
    optimizer = alloc.make_optimizer(lr=2e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    accelerator.register_for_checkpointing(alloc)
    return accelerator, model, alloc, optimizer, schedule


def _train(run, micro_batches):
    accelerator, model, alloc, optimizer, schedule = run
    losses = []
    for i in micro_batches:
        step = i // ACCUMULATE
        with accelerator.accumulate(model):
            with alloc.capture(step):
                loss = mse(model, DATA[i])
                accelerator.backward(loss)
            losses.append(loss.item())
            accelerator.clip_grad_norm_(model.parameters(), 0.5)
            alloc.step(step, optimizer=optimizer)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    return losses


def _state(run):
    _, model, alloc, optimizer, schedule = run
    return {"ranks": alloc.current_ranks(), "decisions": alloc.decisions,
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict()["state"], "lr": schedule.get_last_lr()}


def _assert_same(got, want):
    assert got["ranks"] == want["ranks"] and got["decisions"] == want["decisions"] and got["lr"] == want["lr"]
    assert got["model"].keys() == want["model"].keys()
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert got["optimizer"].keys() == want["optimizer"].keys()
    for index, entry in want["optimizer"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(got["optimizer"][index][name]), torch.as_tensor(value)), (index, name)


def test_save_state_after_rank_changes_resumes_bit_for_bit(tmp_path, fresh_accelerate_state):
    full = _start(fresh_accelerate_state)
    want_losses = _train(full, range(MICRO_BATCHES))
    want = _state(full)
    assert {r["event"] for r in want["decisions"]} == {"grow", "shrink"}

    first = _start(fresh_accelerate_state)
    initial_ranks = first[2].current_ranks()
    losses = _train(first, range(SAVE_AFTER))
    saved_ranks = first[2].current_ranks()
    assert first[2].decisions and saved_ranks != initial_ranks
    first[0].save_state(tmp_path / "ckpt")

    resumed = _start(fresh_accelerate_state)
    resumed[0].load_state(tmp_path / "ckpt")
    assert resumed[2].current_ranks() == saved_ranks
    losses += _train(resumed, range(SAVE_AFTER, MICRO_BATCHES))
    assert losses == want_losses
    _assert_same(_state(resumed), want)

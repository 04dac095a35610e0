"""torch.compile of a whole training step (forward, backward, rank changes, optimizer step).

A user compiles the function that changes ranks too: ``layer.set_rank(r, optimizer=opt)`` on a
schedule, or ``LoRAMBoOptimizer.step`` (online growth). Dynamo traced those edits and decisions:
their host-side state (the rank values, seeded generators, slot ids) became guards, so each new
rank and each decision step recompiled, and past the recompile limit (8) Dynamo ran them
eagerly with no more than a log line. They now always run eagerly (a graph break), so the step
keeps its graphs after the first steps. Each run is compared, step by step, with the same
uncompiled step in float64.
"""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

STEPS, WARMUP = 12, 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    # online growth's capture arms hooks on decision steps: compiled code must see them (docs/backends.md);
    # a limit no run reaches, so that every recompile is counted (at the limit they stop)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False, recompile_limit=64):
        yield
    torch._dynamo.reset()


def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    lorambo.configure_model(model, 1, capacity=8)
    return model


def scheduled_ranks(model):
    """A step that sets every layer's rank from a schedule, 0 and the full pool included."""
    layers = list(lorambo.lora_layers(model).values())
    opt = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule = [1, 2, 3, 2, 4, 0, 5, 8, 1, 6, 7, 3]

    def train_step(x, y, step):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        for layer in layers:
            layer.set_rank(schedule[step], optimizer=opt)
        opt.step()
        opt.zero_grad()
        return loss

    return train_step, lambda: [layer.rank for layer in layers]


def online_growth(model):
    """A step that captures decision steps and lets LoRAMBoOptimizer grow ranks (steps 2, 4, ...)."""
    budget = sum(5 * (m.in_features + m.out_features) for m in lorambo.lora_layers(model).values())
    alloc = LoRAMBoOptimizer(model, budget, warmup_steps=2, interval=2, sketch_rank=2, seed=1)
    opt = alloc.make_optimizer(lr=1e-2)

    def train_step(x, y, step):
        with alloc.capture(step):
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
        alloc.step(step, optimizer=opt)
        opt.step()
        opt.zero_grad()
        return loss

    return train_step, lambda: (alloc.current_ranks(), [(r["layer"], r["old_rank"], r["new_rank"])
                                                        for r in alloc.decisions])


def train(make_step, compiled):
    model = net()
    step_fn, ranks = make_step(model)
    counter = CompileCounterWithBackend("aot_eager")
    if compiled:
        step_fn = torch.compile(step_fn, backend=counter)
    data = torch.Generator().manual_seed(1)
    history, frames_after_warmup = [], None
    for step in range(STEPS):
        x = torch.randn(16, 8, generator=data, dtype=torch.float64)
        y = torch.randn(16, 8, generator=data, dtype=torch.float64)
        loss = step_fn(x, y, step)
        history.append((loss.detach(), [p.detach().clone() for p in model.parameters()]))
        if step == WARMUP - 1:
            frames_after_warmup = counter.frame_count
    return history, ranks(), frames_after_warmup, counter.frame_count


@pytest.mark.parametrize("make_step", [scheduled_ranks, online_growth], ids=["set_rank", "online_growth"])
def test_a_compiled_training_step_keeps_its_graphs_over_rank_changes(make_step):
    want, want_ranks, _, _ = train(make_step, compiled=False)
    got, got_ranks, frames_after_warmup, frames = train(make_step, compiled=True)
    assert got_ranks == want_ranks
    if make_step is online_growth:
        assert want_ranks[1], "no decision grew a rank"
    for step, ((loss, params), (want_loss, want_params)) in enumerate(zip(got, want)):
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12, msg=lambda m: f"step {step} loss\n{m}")
        for i, (p, q) in enumerate(zip(params, want_params)):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=lambda m: f"step {step}, parameter {i}\n{m}")
    assert frames_after_warmup >= 1
    assert frames == frames_after_warmup, f"{frames - frames_after_warmup} recompiles after step {WARMUP - 1}"

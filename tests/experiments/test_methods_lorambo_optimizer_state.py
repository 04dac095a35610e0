"""The online and ALoRA methods change ranks in the middle of training
(lorambo/experiments/methods_lorambo.py): the training loop's optimizer must reach the rank edit,
so that each slot's Adam moments and step count move with it, and a new slot starts as under a
fresh Adam. Without it, ALoRA's compaction leaves moments at the old slot positions (a kept
component trains with another's moments) and every edit warns that state was left behind.

A tiny made-up task (two blocks of two 12 x 12 linear layers), not MiniLM, so the test is fast."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorambo.experiments.config import ExperimentConfig
from lorambo.experiments.methods import RunContext
from lorambo.experiments.registry import make_method
from lorambo.model import lora_layers
from lorambo.nn import StaleOptimizerStateWarning
from lorambo.optim import AdamW

NAMES = [f"layer.{i}.{t}" for i in range(2) for t in ("a", "b")]
WIDTH = 12


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([nn.ModuleDict({t: nn.Linear(WIDTH, WIDTH) for t in ("a", "b")})
                                    for _ in range(2)])

    def forward(self, batch):
        x = batch["x"]
        for block in self.layer:
            x = torch.tanh(block["b"](torch.tanh(block["a"](x))))
        return x


def regression_loss(model, batch):
    return ((model(batch) - batch["y"]) ** 2).mean()


def batches(seed: int, n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(6, WIDTH, generator=gen), "y": torch.randn(6, WIDTH, generator=gen)}
            for _ in range(n)]


def setup(method_name: str, seed: int):
    """(method, model, optimizer, training batches): the method set up on a fresh frozen model."""
    task = SimpleNamespace(name="made_up", names=NAMES, dims={n: (WIDTH, WIDTH) for n in NAMES},
                           loss=regression_loss)
    cfg = ExperimentConfig(tasks=("planted",), methods=(method_name,), steps=10, alora_rounds=1, alora_prune=0.3)
    data = batches(seed, cfg.steps + 2)
    # a mean rank of 2 per layer: online starts at 1, ALoRA prunes some rank-2 layers to feed others
    ctx = RunContext(task, cfg, 2.0, 2 * 2 * WIDTH * len(NAMES), seed, [], data[cfg.steps:])
    method = make_method(method_name, ctx)
    torch.manual_seed(seed)
    model = TwoBlocks().requires_grad_(False)
    model = method.setup(model)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return method, model, optimizer, data[:cfg.steps]


def slot_state(optimizer, layer) -> dict[str, torch.Tensor]:
    """Each per-slot state tensor of the layer's pools, slots along dim 0."""
    out = {}
    for side, param in (("A", layer.lora_A), ("B", layer.lora_B)):
        for key, value in optimizer.state[param].items():
            if torch.is_tensor(value) and value.dim() > 0:
                out[f"{side}.{key}"] = value.clone() if side == "A" or value.dim() == 1 else value.t().clone()
    return out


def train_to_first_decision(method, model, optimizer, data):
    """Train step by step until a step's ``after_backward`` changes ranks; returns (step, ranks
    before, slot state before, its decision records). Warns of stale state as errors."""
    layers = lora_layers(model)
    for step, batch in enumerate(data):
        with method.capture(step, batch):
            regression_loss(model, batch).backward()
        ranks = {n: m.rank for n, m in layers.items()}
        before = {n: slot_state(optimizer, m) for n, m in layers.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error", StaleOptimizerStateWarning)
            method.after_backward(step, optimizer)
        if any(m.rank != ranks[n] for n, m in layers.items()):
            return step, ranks, before, [r for r in method.opt.decisions if r["step"] == step]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    raise AssertionError("no rank changed during the run: the test would check nothing")


def check_state_followed_the_slots(optimizer, layers, before, kept):
    """Kept slots (``kept[n]``: their old indices, in their new order) carry their own state; slots
    added after them start at zero; so do the slots no longer active."""
    for name, layer in layers.items():
        state = slot_state(optimizer, layer)
        assert state.keys() == before[name].keys() and "A.exp_avg" in state and "A.slot_step" in state
        k = len(kept[name])
        for key, value in state.items():
            assert torch.equal(value[:k], before[name][key][kept[name]]), (name, key)
            assert not value[k:].any(), (name, key)   # new slots fresh, inactive ones zero


@pytest.mark.parametrize("seed", [0, 1])
def test_alora_rounds_move_each_kept_components_moments_with_it(seed):
    method, model, optimizer, data = setup("alora", seed)
    step, ranks, before, records = train_to_first_decision(method, model, optimizer, data)
    shrunk = {r["layer"]: r["components"] for r in records if r["event"] == "shrink"}
    assert shrunk and any(r["event"] == "grow" for r in records)
    # the pruned components must be ones whose moments are non-zero: else moving nothing passes
    assert any(before[n]["A.exp_avg"][comps].any() for n, comps in shrunk.items())
    kept = {n: [k for k in range(ranks[n]) if k not in shrunk.get(n, [])] for n in ranks}
    check_state_followed_the_slots(optimizer, lora_layers(model), before, kept)


@pytest.mark.parametrize("seed", [0, 1])
def test_online_growth_gives_its_new_slots_fresh_moments_and_warns_of_nothing_left_behind(seed):
    # growth alone: a slot never active holds no state, so the numbers would match even without
    # the optimizer; what tells its absence is the warning (raised as an error here)
    method, model, optimizer, data = setup("online", seed)
    step, ranks, before, records = train_to_first_decision(method, model, optimizer, data)
    assert records and all(r["event"] == "grow" for r in records)
    assert all(before[n]["A.exp_avg"][:r].any() for n, r in ranks.items() if r)   # trained slots have moments
    check_state_followed_the_slots(optimizer, lora_layers(model), before,
                                   {n: list(range(r)) for n, r in ranks.items()})

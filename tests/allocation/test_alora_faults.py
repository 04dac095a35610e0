"""An ALoRA round stopped part-way (out of memory or Ctrl-C while a layer grows) keeps and logs
the rank changes it made: the decisions and the log describe the model as it is."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.alora import ALoRA, ALoRAConfig
from lorambo.allocation.report import DecisionLog, read_decisions
from lorambo.nn import lora_linear

DT = torch.float64
SCORES = {"0": [-3.0, 5.0], "2": [-2.0, 5.0], "4": [-1.0, 5.0], "6": [4.0, 4.0], "8": [3.0, 3.0]}

pytestmark = pytest.mark.usefixtures("one_thread")


def _round(log_path):
    """ALoRA at its first round: three components go (from 0, 2, 4), 6 grows by 2 and 8 by 1."""
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8, dtype=DT) if i % 2 == 0 else nn.Tanh() for i in range(9)]
    model = lorambo.configure_model(nn.Sequential(*layers), 2, capacity=6)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
    alora = ALoRA(model, lorambo.lora_layers(model), lambda m, b: m(b).pow(2).mean(), [torch.ones(2, 8, dtype=DT)],
                  ALoRAConfig(k1=0, k2=1, rounds=1, n_prune=3), log=DecisionLog(log_path))
    return model, alora


def _scored(monkeypatch):
    from lorambo.sensitivity import ablation

    class Scored:
        def __init__(self, values):
            self.score = torch.tensor(values, dtype=DT)

    monkeypatch.setattr(ablation, "ablation_scores",
                        lambda model, *args, **kwargs: {n: Scored(v) for n, v in SCORES.items()})


@pytest.mark.parametrize("fault", [torch.OutOfMemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("k", [1, 2])  # the first or the last of the two growing layers
def test_a_round_stopped_at_growth_k_logs_the_changes_it_made(tmp_path, monkeypatch, fault, k):
    """Stopped while growing, the round has shrunk three layers (and grown one): the decision list
    and log record those changes, so the budget they freed is not lost to the allocator."""
    _scored(monkeypatch)
    ref_model, ref = _round(tmp_path / "ref.jsonl")
    records = ref.step(0)
    assert [(r["event"], r["layer"]) for r in records] == [("shrink", "0"), ("shrink", "2"), ("shrink", "4"),
                                                           ("grow", "6"), ("grow", "8")]
    model, alora = _round(tmp_path / "run.jsonl")
    calls, real = [], lora_linear.LoRAMBoLinear.set_rank

    def set_rank(self, rank, *args, **kwargs):
        if rank > self.rank:
            calls.append(1)
            if len(calls) == k:
                raise fault("out of memory") if fault is not KeyboardInterrupt else fault
        return real(self, rank, *args, **kwargs)

    monkeypatch.setattr(lora_linear.LoRAMBoLinear, "set_rank", set_rank)
    with pytest.raises(fault) as err:
        alora.step(0)
    done = records[:3 + k - 1]
    assert alora.log.records == done and read_decisions(tmp_path / "run.jsonl") == done
    assert getattr(err.value, "__notes__", []) == [
        f"alora_round (step 0) stopped after {len(done)} rank change(s) "
        f"{[(r['layer'], r['old_rank'], r['new_rank']) for r in done]}, which stay (and are in the decisions and "
        "the decision log of a LoRAMBoOptimizer); the rest of the round was not taken"]
    ranks = {n: m.rank for n, m in lorambo.lora_layers(model).items()}
    assert ranks == {"0": 1, "2": 1, "4": 1, "6": 4 if k == 2 else 2, "8": 2}
    untouched, _ = _round(tmp_path / "untouched.jsonl")
    for name, layer in lorambo.lora_layers(model).items():  # each layer as in the full round, or untouched
        want = (ref_model if ranks[name] != 2 else untouched).get_submodule(name)
        assert torch.equal(layer.lora_A, want.lora_A) and torch.equal(layer.lora_B, want.lora_B), name

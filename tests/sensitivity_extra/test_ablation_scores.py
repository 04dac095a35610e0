"""AB-LoRA ablation scores against brute force on deep copies (keep_components / set_rank(0))."""

import copy

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity.ablation import ablation_scores

DT = torch.float64


def _setup():
    net = nn.Sequential(nn.Linear(5, 7, dtype=DT), nn.Tanh(), nn.Linear(7, 3, dtype=DT))
    model = lorambo.configure_model(net, {"0": 3, "2": 2}, capacity={"0": 4, "2": 3}, dropout=0.1)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :layer.rank].normal_()
    batches = [(torch.randn(8, 5, dtype=DT), torch.randn(8, 3, dtype=DT)) for _ in range(2)]
    return model, batches


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _loss(model, batches):
    model.eval()
    with torch.no_grad():
        return sum(float(mse(model, b)) for b in batches) / len(batches)


def test_scores_match_brute_force_removal_and_alone():
    model, batches = _setup()
    state = copy.deepcopy(model.state_dict())
    model.train()
    got = ablation_scores(model, mse, batches)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    for k, v in model.state_dict().items():  # the pools are restored bit for bit
        assert torch.equal(v, state[k]), k
    full = _loss(copy.deepcopy(model), batches)
    empty_model = copy.deepcopy(model)
    for layer in lorambo.lora_layers(empty_model).values():
        layer.set_rank(0)
    empty = _loss(empty_model, batches)
    for name, layer in lorambo.lora_layers(model).items():
        res = got[name]
        assert res.full_loss == pytest.approx(full, rel=1e-12)
        assert res.empty_loss == pytest.approx(empty, rel=1e-12)
        for k in range(layer.rank):
            removed = copy.deepcopy(model)
            lorambo.lora_layers(removed)[name].keep_components([j for j in range(layer.rank) if j != k])
            alone = copy.deepcopy(model)
            for other_name, other in lorambo.lora_layers(alone).items():
                if other_name == name:
                    other.keep_components([k])
                else:
                    other.set_rank(0)
            assert float(res.removed[k]) == pytest.approx(_loss(removed, batches) - full, rel=1e-9, abs=1e-13)
            assert float(res.alone[k]) == pytest.approx(empty - _loss(alone, batches), rel=1e-9, abs=1e-13)
            assert float(res.score[k]) == pytest.approx(float(res.removed[k] + res.alone[k]))


def test_useless_component_scores_lowest():
    model, batches = _setup()
    layer = lorambo.lora_layers(model)["0"]
    layer.lora_B.data[:, 1] *= 1e-8  # contributes (almost) nothing
    layer.lora_B.data[:, 0] *= 5.0   # contributes a lot (and here: hurts the loss)
    res = ablation_scores(model, mse, batches, modules=["0"], alone=False)
    assert set(res) == {"0"}
    assert abs(float(res["0"].removed[1])) < 1e-6 < abs(float(res["0"].removed[0]))
    assert torch.all(res["0"].alone == 0)


def test_unknown_module_is_named():
    model, batches = _setup()
    with pytest.raises(ValueError, match=r"modules \['1'\] are not LoRAMBoLinear"):
        ablation_scores(model, mse, batches, modules=["1"])


@pytest.mark.parametrize("modules", [None, ["2"]])
def test_merged_layer_is_refused_not_scored_zero(modules):
    """A merged layer's forward ignores lora_B: zeroing its columns changed nothing, so it scored
    exactly 0 everywhere and the other layers' "alone" losses kept its contribution."""
    torch.manual_seed(0)
    model, batches = _setup()
    lorambo.lora_layers(model)["0"].merge()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"ablation_scores: LoRA layer\(s\) \['0'\] are merged.*unmerge"):
        ablation_scores(model, mse, batches, modules=modules)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    lorambo.lora_layers(model)["0"].unmerge()
    removed = ablation_scores(model, mse, batches)["0"].removed
    for k in range(3):  # brute force: drop component k on a copy
        ref = copy.deepcopy(model)
        lorambo.lora_layers(ref)["0"].keep_components([j for j in range(3) if j != k])
        assert float(removed[k]) == pytest.approx(_loss(ref, batches) - _loss(model, batches), rel=1e-9, abs=1e-12)


def test_scores_inside_disable_adapter_are_refused_not_zero():
    """Inside disable_adapter the forward runs the base layers alone: every component scored
    exactly 0, which reads as "all components useless"."""
    model, batches = _setup()
    with lorambo.disable_adapter(model):
        with pytest.raises(RuntimeError, match=r"ablation_scores: the adapters of LoRA layer\(s\) \['0', '2'\] "
                                               r"are disabled.*after the with-block"):
            ablation_scores(model, mse, batches, modules=["2"])
    removed = ablation_scores(model, mse, batches)["2"].removed
    assert bool((removed != 0).all())  # enabled again: real scores

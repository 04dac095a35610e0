"""The state_dict of a merged layer loads as the same function into an unmerged one."""

import pytest
import torch
from torch import nn

import lorambo

transformers = pytest.importorskip("transformers")


def _model(kind):
    torch.manual_seed(0)
    first = nn.Linear(12, 20) if kind == "linear" else transformers.pytorch_utils.Conv1D(20, 12)
    return nn.Sequential(first, nn.Tanh(), nn.Linear(20, 6)).double()


def _reference(model, x):
    """x through the (unmerged) adapted model in float64 with plain torch: W x + b + s B_r A_r x."""
    for module in model:
        if isinstance(module, lorambo.LoRAMBoLinear):
            r = module.rank
            x = (x @ module.weight.T + module.bias
                 + module.scaling * (x @ module.lora_A[:r].T) @ module.lora_B[:, :r].T)
        else:
            x = module(x)
    return x


def _random_adapters_input_and_reference(model, seed: int):
    """Non-zero B in every adapter (so merging changes W), then an input and the float64 output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B[:, :layer.rank].copy_(torch.randn(layer.out_features, layer.rank, generator=g,
                                                           dtype=torch.float64))
        x = torch.randn(4, 12, generator=g, dtype=torch.float64)
        return x, _reference(model, x)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("exact", [True, False])
def test_merged_state_dict_loads_into_an_unmerged_model(kind, exact):
    model = lorambo.configure_model(_model(kind), {"0": 3, "2": 2}, alpha=5.0)
    x, expected = _random_adapters_input_and_reference(model, seed=1)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.merge(exact=exact)
        state = model.state_dict()
        fresh = lorambo.configure_model(_model(kind), {"0": 3, "2": 2}, alpha=5.0)  # same scalings
        for layer in lorambo.lora_layers(fresh).values():
            layer.set_rank(1)  # the ranks come from the state_dict
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)  # the merged model is unchanged
        assert all(layer.merged for layer in lorambo.lora_layers(model).values())


@pytest.mark.parametrize("exact", [True, False])
def test_unloaded_state_dict_of_a_merged_model_holds_the_merged_weights(exact):
    from lorambo.integrations import fsdp

    model = lorambo.configure_model(_model("linear"), 3)
    x, expected = _random_adapters_input_and_reference(model, seed=2)
    with torch.no_grad():
        fsdp.merge(model, exact=exact)
        plain = _model("linear")
        plain.load_state_dict(fsdp.unloaded_state_dict(model))
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-12)


def _randomised(kind, seed):
    model = lorambo.configure_model(_model(kind), {"0": 3, "2": 2}, alpha=5.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B[:, :layer.rank].copy_(torch.randn(layer.out_features, layer.rank, generator=g,
                                                           dtype=torch.float64))
            layer.lora_A[:layer.rank].copy_(torch.randn(layer.rank, layer.in_features, generator=g,
                                                        dtype=torch.float64))
    return model


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("partial", [False, True])
def test_a_state_dict_loads_into_a_merged_model(kind, exact, partial):
    """set_extra_state refused a merged layer after its pools were already replaced, so the model
    was left merged with the old adapter's weight and the new pools; unmerge() then subtracted
    the new adapter from it."""
    src, dst = _randomised(kind, 3), _randomised(kind, 4)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        expected = _reference(src, x)
        for layer in lorambo.lora_layers(dst).values():
            layer.merge(exact=exact)
        state = src.state_dict()
        if partial:  # the adapter only: pools and ranks
            state = {k: v for k, v in state.items() if k.endswith(("lora_A", "lora_B", "_extra_state"))}
        dst.load_state_dict(state, strict=not partial)
        assert not any(layer.merged for layer in lorambo.lora_layers(dst).values())
        torch.testing.assert_close(dst(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_model_assigned_a_merged_state_dict_does_not_share_the_kept_original(kind):
    """An exact merge keeps the original weight for unmerge(); the state_dict used to hand out
    that very tensor, so a model loaded from it with assign=True held it as its weight, and
    merging that model changed what the first one's unmerge() restored (off by 0.55 on a Linear)."""
    source = lorambo.configure_model(_model(kind), 2, target_modules=["0"], capacity=4, alpha=3.0)
    x, want = _random_adapters_input_and_reference(source, seed=3)
    original = source[0].base_layer.weight.detach().clone()
    source[0].merge(exact=True)
    target = lorambo.configure_model(_model(kind), 2, target_modules=["0"], capacity=4, alpha=3.0)
    target.load_state_dict(source.state_dict(), assign=True)
    target[0].merge(exact=True)
    with torch.no_grad():
        torch.testing.assert_close(target(x), want, rtol=1e-12, atol=1e-12)
        source[0].unmerge()
        assert torch.equal(source[0].base_layer.weight, original)
        torch.testing.assert_close(source(x), want, rtol=1e-12, atol=1e-12)

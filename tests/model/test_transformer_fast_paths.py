"""torch's nn.TransformerEncoderLayer runs a fused fast path in eval mode that reads linear1/linear2
weights without calling those modules: adapted, their LoRA was skipped and eval outputs were the
base model's. The reference here is torch's own fast path on the merged model."""

import copy
import pickle

import pytest
import torch
from torch import nn

import lorambo


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor: padded batches become nested
    lorambo.configure_model(model, 3, target_modules=["linear1", "linear2"])
    with torch.no_grad():
        for adapter in lorambo.lora_layers(model).values():
            adapter.lora_B[:, :adapter.rank].normal_(std=0.3)
    return model.eval()


@pytest.mark.parametrize("padded", [False, True])
def test_eval_outputs_include_the_adapters(padded):
    model = _encoder()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if padded else None
    merged = lorambo.unload(copy.deepcopy(model), merge=True)  # plain modules again: torch's fast path
    assert merged.use_nested_tensor and not merged.layers[0]._forward_pre_hooks
    with torch.no_grad():
        got, want = model(x, src_key_padding_mask=mask), merged(x, src_key_padding_mask=mask)
        with lorambo.disable_adapter(model):
            base = model(x, src_key_padding_mask=mask)
    keep = slice(None) if mask is None else ~mask  # a nested fast path zeroes padded positions
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)
    assert (got[keep] - base[keep]).abs().max() > 0.1  # the adapters change the output


def test_copies_keep_the_adapters_in_the_forward():
    model = _encoder()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(twin(x), want, rtol=0, atol=0)


def test_a_re_rank_keeps_the_fast_path_off_and_an_encoder_without_adapters_keeps_it():
    torch.manual_seed(0)
    encoders = nn.ModuleDict({k: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True,
                                                                                    dropout=0.0), 2) for k in "ab"})
    names = [f"a.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    for rank in (3, 2):  # configure again: the hooks stay, and b keeps its fast path each time
        lorambo.configure_model(encoders, dict.fromkeys(names, rank), capacity=4 if rank == 3 else None)
        assert encoders["b"].use_nested_tensor
    with torch.no_grad():
        for adapter in lorambo.lora_layers(encoders).values():
            adapter.lora_B[:, :adapter.rank].normal_(std=0.3)
    a, b = encoders["a"].eval(), encoders["b"].eval()
    assert not a.use_nested_tensor and all(len(layer._forward_pre_hooks) == 1 for layer in a.layers)
    assert b.use_nested_tensor and not any(layer._forward_pre_hooks for layer in b.layers)  # its fast path stays
    x = torch.randn(2, 5, 16)
    merged = lorambo.unload(copy.deepcopy(encoders), merge=True)
    with torch.no_grad():
        torch.testing.assert_close(a(x), merged["a"](x), rtol=1e-4, atol=1e-5)


def test_unload_gives_back_the_nested_tensor_setting_of_the_last_configure():
    """An encoder whose nested tensors the user turned off between two adaptations stays so."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 2)
    lorambo.unload(lorambo.configure_model(model, 2, target_modules=["linear1"]), merge=False)
    assert model.use_nested_tensor
    model.use_nested_tensor = False
    lorambo.unload(lorambo.configure_model(model, 2, target_modules=["linear1"]), merge=False)
    assert not model.use_nested_tensor

"""Loading an adapter writes every slot it activates from the file, so it draws nothing from
torch's global generator: the caller's random stream (dropout masks, data order) is unchanged."""

import torch

from lorambo import configure_model, load_adapter, lora_layers, save_adapter

from adapter_models import net, trained  # tests/adapters/adapter_models.py


def _loaded_keeps_rng(dst, file):
    torch.manual_seed(7)
    want = torch.rand(5)
    torch.manual_seed(7)
    load_adapter(dst, file)
    assert torch.equal(torch.rand(5), want)  # the same numbers as if nothing had been loaded


def test_load_into_a_configured_model_that_grows_keeps_the_global_rng(tmp_path):
    """set_rank's Kaiming init of the grown rows drew from the global RNG, then the file's
    values replaced them."""
    src = trained()
    file = save_adapter(src, tmp_path / "a.safetensors")
    dst = configure_model(net(), {"0": 1, "2": 1}, capacity=8, alpha=16.0)
    _loaded_keeps_rng(dst, file)
    x = torch.randn(5, 12)
    assert torch.equal(dst(x), src(x))
    assert {n: l.rank for n, l in lora_layers(dst).items()} == {"0": 3, "2": 5}


def test_load_into_a_bare_model_keeps_the_global_rng(tmp_path):
    """Building the layers at the file's ranks initialised rows the file then overwrote."""
    src = trained()
    file = save_adapter(src, tmp_path / "a.safetensors")
    dst = net()
    _loaded_keeps_rng(dst, file)
    x = torch.randn(5, 12)
    assert torch.equal(dst(x), src(x))
    for name, layer in lora_layers(dst).items():  # the inactive slots stay zero
        assert not layer.lora_A[layer.rank:].any() and not layer.lora_B[:, layer.rank:].any(), name

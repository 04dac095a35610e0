"""The plain model's state_dict loads into the adapted model also where the base weight is
parametrized: ``nn.utils.parametrizations.weight_norm`` saves ``fc.parametrizations.weight.original0``
/ ``original1`` (spectral_norm its ``_u`` / ``_v`` buffers too), not ``fc.weight``. Only weight and
bias were moved under ``base_layer``, so with strict=False those keys came back unexpected, the
base kept the weights it was built with, and the adapted layer's output differed from the
checkpoint's (max |diff| 2.1)."""

import torch
from torch import nn
from torch.nn.utils import parametrizations

from lorambo import configure_model, lora_layers


def _plain():
    model = nn.Module()
    model.wn = parametrizations.weight_norm(nn.Linear(7, 6, dtype=torch.float64))
    model.sn = parametrizations.spectral_norm(nn.Linear(6, 5, dtype=torch.float64))
    return model.eval()  # spectral_norm: eval reads the saved u, v without a power iteration


def test_a_plain_checkpoint_with_parametrized_weights_loads_into_the_adapted_model():
    torch.manual_seed(0)
    plain = _plain()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    with torch.device("meta"):
        model = configure_model(_plain(), 2, capacity=4, alpha=6.0)
    model.to_empty(device="cpu")
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(f"{n}.{k}" for n in ("wn", "sn")
                                                 for k in ("lora_A", "lora_B", "_extra_state"))
    for layer in lora_layers(model).values():
        layer.reset_parameters()
        with torch.no_grad():
            layer.lora_B[:, :2].normal_()

    # the weights from the saved tensors, by hand
    g, v = state["wn.parametrizations.weight.original0"], state["wn.parametrizations.weight.original1"]
    w_wn = g * v / v.norm(dim=1, keepdim=True)
    w, u, v = (state[f"sn.parametrizations.weight.{k}"] for k in ("original", "0._u", "0._v"))
    w_sn = w / (u @ w @ v)
    for name, weight in (("wn", w_wn), ("sn", w_sn)):
        layer = model.get_submodule(name)
        x = torch.randn(4, layer.in_features, dtype=torch.float64, requires_grad=True)
        a, b = layer.lora_A[:2].detach(), layer.lora_B[:, :2].detach()
        want = x @ weight.t() + state[f"{name}.bias"] + layer.scaling * (x @ a.t()) @ b.t()
        got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        (gx,) = torch.autograd.grad(got.sum(), x)
        (want_gx,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(gx, want_gx, rtol=1e-12, atol=1e-12)

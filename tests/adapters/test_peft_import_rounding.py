"""import_peft / from_peft into a half-precision model: peft keeps the adapter of a float16 /
bfloat16 base in float32 (``autocast_adapter_dtype``), while lorambo's pools take the base
weight's dtype, so the adapter is rounded on the way in. That changes the outputs (and trains
the pools in half precision): it warns, naming the layers and both dtypes. Weights that the
pools hold exactly, or that peft's own load would round alike (float64 into float32), convert
without a warning."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorambo import from_peft, import_peft, lora_layers

from adapter_models import net  # tests/adapters/adapter_models.py

_ROUNDED = r"'0', '2'\]\) hold float32 LoRA weights, which their pools \(the base weight's dtype, torch\.bfloat16\) round"


def _peft(dtype):
    """A peft model after one AdamW step: peft draws A and B in the base's dtype (exact in it) and
    trains them in float32, so only training gives them values half precision cannot hold."""
    peft_model = get_peft_model(net().to(dtype), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(4)).to(dtype)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model(x).float().square().mean().backward()
    optimizer.step()
    return peft_model


def _peft_weights(peft_model, name):
    layer = peft_model.get_base_model().get_submodule(name)
    return layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()


def _no_rounding_warning(convert):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert()
    assert not [w for w in caught if "round" in str(w.message)], [str(w.message) for w in caught]
    return model


def test_from_peft_into_bfloat16_warns_that_peft_float32_adapter_is_rounded():
    peft_model = _peft(torch.bfloat16)
    a, b = _peft_weights(peft_model, "0")
    assert a.dtype == torch.float32 and not torch.equal(a.bfloat16().float(), a)  # trained in float32
    with pytest.warns(UserWarning, match=_ROUNDED):
        model = from_peft(peft_model)
    layer = lora_layers(model)["0"]
    assert layer.lora_A.dtype == torch.bfloat16
    assert torch.equal(layer.lora_A[:4], a.bfloat16()) and torch.equal(layer.lora_B[:, :4], b.bfloat16())


def test_import_peft_into_bfloat16_warns_and_float32_keeps_the_weights_exactly(tmp_path):
    peft_model = _peft(torch.float32)
    peft_model.save_pretrained(tmp_path / "peft")
    a, _ = _peft_weights(peft_model, "0")
    with pytest.warns(UserWarning, match=_ROUNDED):
        import_peft(net().bfloat16(), tmp_path / "peft")
    model = _no_rounding_warning(lambda: import_peft(net(), tmp_path / "peft"))
    assert torch.equal(lora_layers(model)["0"].lora_A[:4], a)
    _no_rounding_warning(lambda: import_peft(net().double(), tmp_path / "peft"))  # float32 -> float64: exact


def test_float64_weights_into_float32_convert_without_warning(tmp_path):
    """peft itself loads a float64 adapter into a float32 model's float32 adapter, rounded alike."""
    peft_model = _peft(torch.float64)
    peft_model.save_pretrained(tmp_path / "peft")
    a, _ = _peft_weights(peft_model, "0")
    model = _no_rounding_warning(lambda: import_peft(net(), tmp_path / "peft"))
    assert torch.equal(lora_layers(model)["0"].lora_A[:4], a.float())


def test_weights_already_in_the_pools_dtype_convert_without_warning(tmp_path):
    peft_model = get_peft_model(net().bfloat16(), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False),
                                autocast_adapter_dtype=False)
    assert _peft_weights(peft_model, "0")[0].dtype == torch.bfloat16
    peft_model.save_pretrained(tmp_path / "peft")
    _no_rounding_warning(lambda: from_peft(peft_model))
    _no_rounding_warning(lambda: import_peft(net().bfloat16(), tmp_path / "peft"))

"""The values import_peft / from_peft copy into the pools: peft's B A of a rank above min(in, out)
is formed in float64 and rounded once into the pool's dtype, after a range check against that
dtype; NaN/inf weights are refused naming the layer. A refusal changes nothing."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from lorambo import from_peft, import_peft, lora_layers

from adapter_models import net  # tests/adapters/adapter_models.py


def _pair(scale, seed=3):
    """float16 peft weights of rank 6 for layer "4" (12 -> 4), where a pool holds at most 4 slots."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(6, 12, generator=g, dtype=torch.float64) * scale).half()
    b = (torch.randn(4, 6, generator=g, dtype=torch.float64) * scale).half()
    return a, b


def _write(folder, a, b, extra=None, modules_to_save=None):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"base_model.model.4.lora_A.weight": a.contiguous(), "base_model.model.4.lora_B.weight": b.contiguous()}
    tensors.update(extra or {})
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 6, "lora_alpha": 6, "target_modules": ["4"],
              "modules_to_save": modules_to_save}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snapshot):
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(  # bit for bit, NaN included
        state[k].dtype == snapshot[k].dtype and torch.equal(state[k].view(-1).view(torch.uint8),
                                                            snapshot[k].view(-1).view(torch.uint8)) for k in state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_float16_product_past_65504_imports_rounded_once_into_a_wider_model(tmp_path, dtype):
    """The product was rounded to the adapter's float16 before the range check (which skipped
    it: same dtype as a float16 model) and before the copy: 2 of its 48 values became inf in a
    float32 model too, whose dtype holds them."""
    a, b = _pair(scale=100.0)
    product = b.double() @ a.double()  # the float64 reference: exact for float16 factors
    assert product.abs().max() > 65504 and a.abs().max() < 65504 and b.abs().max() < 65504
    model = import_peft(net().to(dtype), _write(tmp_path / "peft", a, b))
    layer = lora_layers(model)["4"]
    assert layer.rank == 4 and layer.scaling == 1.0  # peft's 6 / 6
    assert torch.equal(layer.lora_A[:4], product.to(dtype))  # one rounding, from float64
    assert torch.equal(layer.lora_B[:, :4], torch.eye(4, dtype=dtype))
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base = net().double()[4]
    expected = base(x) + x @ product.T  # scaling 1
    got = model[4](x.to(dtype)).double()
    torch.testing.assert_close(got, expected, rtol=3 * torch.finfo(dtype).eps, atol=3 * torch.finfo(dtype).eps
                               * float((x.abs() @ product.abs().T).max()))


def test_a_float16_product_past_65504_into_a_float16_model_is_refused_by_import_peft(tmp_path):
    a, b = _pair(scale=100.0)
    model = net().half()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer '4': lora_A \(peft's product lora_B @ lora_A, its rank 6 stored at "
                                         r"rank 4 = min\(in, out\)\) holds 2 value\(s\) that the model's "
                                         r"torch\.float16 cannot hold \(largest \|value\| 84305\.6"):
        import_peft(model, _write(tmp_path / "peft", a, b))
    assert not lora_layers(model) and _same(model, before)


def _peft_model(a, b, dtype=torch.float16):
    peft_model = get_peft_model(net().to(dtype), LoraConfig(r=6, lora_alpha=6, target_modules=["4"]))
    layer = peft_model.base_model.model[4]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return peft_model


def test_a_float16_product_past_65504_is_refused_by_from_peft_leaving_peft_working():
    a, b = _pair(scale=100.0)
    peft_model = _peft_model(a, b)
    before = _snapshot(peft_model)
    with pytest.raises(ValueError, match=r"layer '4': lora_A \(peft's product.*torch\.float16 cannot hold"):
        from_peft(peft_model)
    assert _same(peft_model, before) and not lora_layers(peft_model)


def test_a_float16_product_within_range_converts_rounded_once_by_from_peft():
    a, b = _pair(scale=20.0)
    product = b.double() @ a.double()
    assert 2048 < product.abs().max() < 65504  # float16 spacing > 1 there: a double rounding shows
    layer = lora_layers(from_peft(_peft_model(a, b)))["4"]
    assert torch.equal(layer.lora_A[:4], product.half()) and torch.equal(layer.lora_B[:, :4], torch.eye(4).half())


@pytest.mark.parametrize("where", ["lora_A", "lora_B"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_peft_weights_are_refused_naming_the_layer(tmp_path, where, bad):
    """import_peft copied NaN/inf weights into the pools without a word; the model then computed NaN."""
    a, b = _pair(scale=1.0)
    (a if where == "lora_A" else b)[1, 2] = bad
    model = net()
    before = _snapshot(model)
    size = (a if where == "lora_A" else b).numel()
    with pytest.raises(ValueError, match=rf"layer '4': {where} holds 1 NaN/inf value\(s\) of {size}"):
        import_peft(model, _write(tmp_path / "peft", a, b))
    assert not lora_layers(model) and _same(model, before)

    peft_model = _peft_model(a, b, torch.float32)
    before = _snapshot(peft_model)
    with pytest.raises(ValueError, match=rf"layer '4': {where} holds 1 NaN/inf"):
        from_peft(peft_model)
    assert _same(peft_model, before) and not lora_layers(peft_model)


def test_a_non_finite_module_to_save_is_refused_naming_it(tmp_path):
    a, b = _pair(scale=1.0)
    head = nn.Linear(16, 12)
    weight = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))
    weight[3, 4] = float("nan")
    extra = {"base_model.model.2.weight": weight, "base_model.model.2.bias": head.bias.detach().clone()}
    model = net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"module to save '2': parameter 'weight' holds 1 NaN/inf value\(s\)"):
        import_peft(model, _write(tmp_path / "peft", a, b, extra, modules_to_save=["2"]))
    assert not lora_layers(model) and _same(model, before)

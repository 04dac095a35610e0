"""Loading an adapter into a model of a narrower dtype: values the model's dtype cannot hold (a
float32 adapter beyond 65504 into a float16 model) are refused before anything changes; values
within range are rounded once, as a cast rounds them."""

import pytest
import torch

from lorambo import configure_model, export_peft, import_peft, load_adapter, lora_layers, save_adapter

from adapter_models import net, trained  # tests/adapters/adapter_models.py


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snapshot):
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in state)


def test_fp32_values_beyond_float16_are_refused_by_load_adapter(tmp_path):
    src = trained()
    with torch.no_grad():
        lora_layers(src)["2"].lora_B[1, 2] = 1e5  # float16 holds up to 65504
    save_adapter(src, tmp_path / "a.safetensors")

    into_lora = trained().half()
    before = _snapshot(into_lora)
    with pytest.raises(ValueError, match=r"layer '2': lora_B holds 1 value.*torch\.float16.*100000"):
        load_adapter(into_lora, tmp_path / "a.safetensors")
    assert _same(into_lora, before)

    bare = net().half()
    with pytest.raises(ValueError, match=r"layer '2': lora_B.*torch\.float16"):
        load_adapter(bare, tmp_path / "a.safetensors")
    assert not lora_layers(bare)  # left as it came: not configured

    loaded = load_adapter(net().to(torch.bfloat16), tmp_path / "a.safetensors")  # bfloat16 holds it
    torch.testing.assert_close(lora_layers(loaded)["2"].lora_B[1, 2].double(),
                               torch.tensor(1e5, dtype=torch.float64), rtol=2 ** -8, atol=0)


def test_values_within_range_are_rounded_once(tmp_path):
    src = trained().double()
    save_adapter(src, tmp_path / "a.safetensors")
    loaded = load_adapter(net().half(), tmp_path / "a.safetensors")
    assert lora_layers(loaded).keys() == lora_layers(src).keys() and lora_layers(src)
    for name, layer in lora_layers(loaded).items():
        ref = lora_layers(src)[name]
        r = ref.rank
        assert torch.equal(layer.lora_A[:r], ref.lora_A[:r].half())
        assert torch.equal(layer.lora_B[:, :r], ref.lora_B[:, :r].half())


def test_a_module_to_save_beyond_float16_is_refused(tmp_path):
    src = configure_model(net(), {"0": 3}, capacity={"0": 8}, modules_to_save=["4"])
    with torch.no_grad():
        src[4].weight[0, 0] = -7e4
    save_adapter(src, tmp_path / "a.safetensors")
    into = configure_model(net(), {"0": 3}, capacity={"0": 8}, modules_to_save=["4"]).half()
    before = _snapshot(into)
    with pytest.raises(ValueError, match=r"module to save '4': parameter 'weight'.*torch\.float16.*70000"):
        load_adapter(into, tmp_path / "a.safetensors")
    assert _same(into, before)


def test_import_peft_refuses_values_beyond_float16(tmp_path):
    src = trained()
    with torch.no_grad():
        lora_layers(src)["0"].lora_A[0, 5] = 2e5
    export_peft(src, tmp_path / "peft")
    bare = net().half()
    before = _snapshot(bare)
    with pytest.raises(ValueError, match=r"layer '0': lora_A holds 1 value.*torch\.float16.*200000"):
        import_peft(bare, tmp_path / "peft")
    assert not lora_layers(bare) and _same(bare, before)

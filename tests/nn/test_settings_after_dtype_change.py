"""A scaling or dropout is checked against the dtype the layer computes in on every path that
changes dtype or settings after the layer is built: ``.half()`` / ``.to(torch.float16)``,
autocast, a ``load_state_dict``, ``load_adapter`` or peft import of a scaling that overflows
float16. Unchecked, the forward gives inf (scaling 2.5e5, or the dropout scale 1 / (1 - p) =
1e5), or an adapter that adds nothing and gets no gradient (scaling 2.5e-10 rounds to 0). Each
path raises a ValueError naming the layer, the setting and its value, where the combination is
made (a load, before it changes anything) or at the first forward (a conversion)."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear, export_peft, import_peft, load_adapter, save_adapter

HALF = torch.float16


def _layer(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(8, 6, dtype=dtype), rank=4, capacity=4, name="blk.q", **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _x(dtype=HALF):
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("convert", [lambda m: m.half(), lambda m: m.to(torch.float16)], ids=["half", "to"])
@pytest.mark.parametrize("settings,match", [
    ({"alpha": 1e6}, r"'blk\.q': scaling 250000\.0 \(alpha=1000000\.0\) rounds to inf in torch\.float16"),
    ({"alpha": 1e-9}, r"'blk\.q': scaling 2\.5e-10 \(alpha=1e-09\) rounds to 0 .* in torch\.float16"),
    ({"dropout": 0.99999}, r"'blk\.q': dropout 0\.99999 scales the kept inputs by 1 / \(1 - p\) = 1e\+05, which "
                           r"overflows torch\.float16"),
])
def test_a_conversion_after_building_is_refused_at_the_first_forward(convert, settings, match):
    layer = convert(_layer(**settings)).train()
    with pytest.raises(ValueError, match=match):
        layer(_x())


def test_dropout_beyond_float16_runs_in_eval_mode_where_it_is_off():
    layer = _layer(dropout=0.99999).half().eval()
    x = _x()
    w, b = (t.detach().double() for t in (layer.base_layer.weight, layer.base_layer.bias))
    expected = x.double() @ w.T + b + layer.scaling * (x.double() @ layer.lora_A.double().T) @ layer.lora_B.double().T
    torch.testing.assert_close(layer(x).double(), expected, rtol=4e-3, atol=4e-3)


def test_autocast_to_float16_is_refused_naming_it():
    layer = _layer(alpha=1e6).eval()
    with torch.autocast("cpu", dtype=HALF), pytest.raises(ValueError, match=r"rounds to inf in torch\.float16 "
                                                                            r"\(under autocast\)"):
        layer(_x(torch.float32))


def test_load_state_dict_of_a_scaling_beyond_the_layer_dtype_changes_nothing():
    source = _layer(alpha=1e6)
    layer = _layer(HALF)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"'blk\.q': state_dict: scaling 250000\.0 \(alpha=1000000\.0\) rounds to "
                                         r"inf in torch\.float16"):
        layer.load_state_dict({k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()})
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert layer.scaling == 1.0


def test_load_adapter_of_a_scaling_beyond_the_model_dtype_changes_nothing(tmp_path):
    save_adapter(nn.Sequential(_layer(alpha=1e6)), tmp_path / "a.safetensors")
    adapted = nn.Sequential(_layer(HALF))
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer '0'.*scaling 250000\.0 \(alpha=1000000\.0\) rounds to inf in "
                                         r"torch\.float16"):
        load_adapter(adapted, tmp_path / "a.safetensors")
    assert all(torch.equal(before[k], v) for k, v in adapted.state_dict().items())
    bare = nn.Sequential(nn.Linear(8, 6, dtype=HALF))
    with pytest.raises(ValueError, match=r"layer '0'.*rounds to inf in torch\.float16"):
        load_adapter(bare, tmp_path / "a.safetensors")
    assert type(bare[0]) is nn.Linear


def test_peft_import_of_a_scaling_beyond_the_model_dtype_changes_nothing(tmp_path):
    export_peft(nn.Sequential(_layer(alpha=1e6)), tmp_path / "peft")
    bare = nn.Sequential(nn.Linear(8, 6, dtype=HALF))
    with pytest.raises(ValueError, match=r"module '0'.*scaling 250000\.0 .* rounds to inf in torch\.float16"):
        import_peft(bare, tmp_path / "peft")
    assert type(bare[0]) is nn.Linear

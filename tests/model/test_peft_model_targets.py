"""A model wrapped by peft is refused where lorambo picks targets or loads adapters, before
anything is measured or changed.

peft's LoRA layers hold plain Linear modules (``base_layer``, ``lora_A.default``,
``lora_B.default``). ``LoRAMBoOptimizer(peft_model, ...)`` took them for targets: it allocated
ranks to peft's own A and B, and refused only in ``configure()``, after the measurement (with
``sensitivity_method="gradient"`` the measurement itself failed with "unknown module
'...c_attn.base_layer'"). Like ``configure_model``, target lookup now names the peft modules and
points to ``lorambo.from_peft``. ``import_peft`` said "Linear is not nn.Linear or transformers
Conv1D" and ``load_adapter`` suggested peft's own names ("did you mean
['base_model.model.…']"); both now give that message too."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lorambo
from lorambo.model import find_targets


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(6, 10), nn.Linear(10, 6)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _peft_model():
    torch.manual_seed(0)
    return get_peft_model(_Net(), LoraConfig(r=2, target_modules=["up"], init_lora_weights=False))


_REFUSED = r"holds peft modules \(.*peft\.tuners\.lora\.layer\.Linear.*lorambo\.from_peft"


@pytest.mark.parametrize("target_modules", [None, "all-linear", ["down"], r".*down"])
def test_allocator_on_a_peft_model_is_refused_before_measuring(target_modules):
    peft_model = _peft_model()
    with pytest.raises(ValueError, match="^LoRAMBoOptimizer: PeftModel " + _REFUSED):
        lorambo.LoRAMBoOptimizer(peft_model, 500, sensitivity_method="gradient", target_modules=target_modules)


def test_find_targets_refuses_a_peft_model_and_takes_the_converted_one():
    peft_model = _peft_model()
    with pytest.raises(ValueError, match=_REFUSED):
        find_targets(peft_model, None)
    converted = lorambo.from_peft(peft_model)
    assert find_targets(converted, None) == ["up", "down"]  # the LoRAMBoLinear and the plain Linear


def test_loading_into_a_peft_model_is_refused_leaving_it_as_it_was(tmp_path):
    adapted = lorambo.configure_model(_Net(), 2, target_modules=["up"])
    lorambo.save_adapter(adapted, tmp_path / "lorambo")
    _peft_model().save_pretrained(tmp_path / "peft")
    peft_model = _peft_model()
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    expected = peft_model(x)
    for load, folder in ((lorambo.import_peft, "peft"), (lorambo.load_adapter, "lorambo")):
        with pytest.raises(ValueError, match=rf"{load.__name__}: PeftModel holds peft modules \(.*lorambo\.from_peft"):
            load(peft_model, tmp_path / folder)
    after = peft_model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(peft_model(x), expected)

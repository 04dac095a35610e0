"""from_peft keeps the pools peft's model froze: LoRA-FA (peft's create_lorafa_optimizer freezes
every lora_A) and a layer frozen whole. Reference: float64 plain tensors of peft's weights,
trained by SGD with the same pools frozen."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_lorafa_optimizer
from torch import nn

from lorambo import from_peft, lora_layers

DT = torch.float64
NAMES = ("l1", "l2", "l3")

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 9, dtype=DT), nn.Linear(9, 7, dtype=DT), nn.Linear(7, 4, dtype=DT)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def test_pools_frozen_in_peft_stay_frozen_and_train_as_the_reference():
    torch.manual_seed(0)
    base = _Net()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=5, target_modules=list(NAMES)))
    g = torch.Generator().manual_seed(1)
    modules = {n: peft_model.base_model.model.get_submodule(n) for n in NAMES}
    with torch.no_grad():
        for module in modules.values():
            module.lora_B["default"].weight.normal_(generator=g)
    create_lorafa_optimizer(peft_model, r=3, lora_alpha=5, lr=0.1)  # freezes every lora_A
    modules["l3"].lora_B["default"].weight.requires_grad_(False)  # l3 frozen whole for this phase
    ref = {n: {p: getattr(m, p)["default"].weight.detach().clone().requires_grad_(
        getattr(m, p)["default"].weight.requires_grad) for p in ("lora_A", "lora_B")} for n, m in modules.items()}
    model = from_peft(peft_model)
    layers = lora_layers(model)
    # before, every pool was trainable after the conversion, and training moved the frozen ones
    assert {n: (m.lora_A.requires_grad, m.lora_B.requires_grad) for n, m in layers.items()} == \
        {"l1": (False, True), "l2": (False, True), "l3": (False, False)}

    def ref_forward(x):
        for i, name in enumerate(NAMES):
            layer = getattr(base, name)
            x = x @ layer.weight.T + layer.bias + 5 / 3 * (x @ ref[name]["lora_A"].T) @ ref[name]["lora_B"].T
            x = torch.tanh(x) if i < 2 else x
        return x

    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=gen, dtype=DT), torch.randn(8, 4, generator=gen, dtype=DT))
               for _ in range(3)]
    for params, forward in (([p for p in model.parameters() if p.requires_grad], model),
                            ([t for pools in ref.values() for t in pools.values() if t.requires_grad], ref_forward)):
        opt = torch.optim.SGD(params, lr=0.05)
        for x, y in batches:
            ((forward(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
    for name, layer in layers.items():
        assert torch.allclose(layer.lora_A[:3], ref[name]["lora_A"], rtol=1e-10, atol=1e-12), name
        assert torch.allclose(layer.lora_B[:, :3], ref[name]["lora_B"], rtol=1e-10, atol=1e-12), name
    x = batches[0][0]
    assert torch.allclose(model(x), ref_forward(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["inference", "frozen_whole", "lora_fa"])
def test_an_adapter_frozen_whole_converts_trainable(tmp_path, how):
    """peft freezes every pool of an adapter loaded for inference (its default), and a model frozen
    whole froze them all too: no training choice, and the conversion trains them as import_peft's
    does; one loaded trainable keeps the pools frozen after loading (LoRA-FA)."""
    from peft import PeftModel

    torch.manual_seed(0)
    get_peft_model(_Net(), LoraConfig(r=3, lora_alpha=5, target_modules=list(NAMES))).save_pretrained(tmp_path)
    peft_model = PeftModel.from_pretrained(_Net(), tmp_path, is_trainable=how != "inference")
    if how == "lora_fa":
        create_lorafa_optimizer(peft_model, r=3, lora_alpha=5, lr=0.1)
    if how == "frozen_whole":
        peft_model.requires_grad_(False)
    flags = {n: (m.lora_A.requires_grad, m.lora_B.requires_grad) for n, m in lora_layers(from_peft(peft_model)).items()}
    assert flags == dict.fromkeys(NAMES, (how != "lora_fa", True))

"""GPT-2's Conv1D bases are kept, not copied: LoRAMBoLinear reads at wrap only the class, the
sizes (weight [in, out]) and the weight's dtype and device, and the forward reads the Conv1D's
weight at every call. So a pretrained state_dict loaded after configure_model (strict=False:
the adapters' keys missing), an in-place edit or an assigned weight is what runs, and unload
gives the same model with the same Conv1D objects back, the delta merged in their [in, out]
layout (docs/model.md, LoRAMBoLinear)."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lorambo import configure_model, lora_layers, unload

IDS = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(1))


def _gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=48, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double().eval()


def test_a_pretrained_load_and_in_place_edits_of_the_conv1d_reach_the_adapted_model():
    pretrained, model = _gpt2(0), _gpt2(1)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    configure_model(model, 2, capacity=4)
    assert set(lora_layers(model)) == set(convs)
    result = model.load_state_dict(pretrained.state_dict(), strict=False)
    assert not result.unexpected_keys
    adapter_keys = (f"{n}.{k}" for n in convs for k in ("lora_A", "lora_B", "_extra_state"))
    assert sorted(result.missing_keys) == sorted(adapter_keys)
    torch.testing.assert_close(model(IDS).logits, pretrained(IDS).logits, rtol=0, atol=0)  # lora_B is 0

    with torch.no_grad():  # an edit of the Conv1D object the user held before configure_model
        for name, conv in convs.items():
            conv.weight.mul_(0.5)
            pretrained.get_submodule(name).weight.mul_(0.5)
    torch.testing.assert_close(model(IDS).logits, pretrained(IDS).logits, rtol=0, atol=0)


def test_unload_gives_the_same_conv1d_objects_back_with_the_delta_in_their_layout():
    model = _gpt2(0)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    before = {n: m.weight.detach().clone() for n, m in convs.items()}
    configure_model(model, 2, capacity=4, alpha=3.0)
    deltas = {}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_B.normal_()
            a, b = layer.lora_A[:2].double(), layer.lora_B[:, :2].double()
            deltas[name] = layer.scaling * (b @ a)  # [out, in]
    adapted = model(IDS).logits
    assert unload(model, merge=True) is model
    for name, conv in convs.items():
        assert model.get_submodule(name) is conv
        torch.testing.assert_close(conv.weight, before[name] + deltas[name].t(), rtol=1e-12, atol=1e-12)
        assert conv.weight.requires_grad
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-10, atol=1e-10)

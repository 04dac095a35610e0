"""transformers' ``tie_weights()`` (also called by ``resize_token_embeddings``) ties each
``{target: source}`` pair of the model's tie mapping again by assignment. A module to save whose
weight was tied (GPT-2's ``lm_head`` and ``wte``) trains its own copy of that weight, so the pair
would put the frozen embedding back in place of the trained head (or the trained embedding into
the frozen head), silently and with ``requires_grad`` gone. ``configure_model`` takes the copied
parameters out of the mapping; the reference is the plain float64 model with ``W + s B_r A_r``
written in and the trained weight in its module alone."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo import lora_layers

from tied_gpt2 import IDS, WEIGHT, tied_gpt2


class _Holder(nn.Module):
    """A model holding the tied GPT-2 as a submodule ("lm"), as a user's wrapper does."""

    def __init__(self):
        super().__init__()
        self.lm = tied_gpt2()


def _trained(head, nested=False):
    """Non-uniform ranks after a rank change, random active slots and a trained module to save;
    ``nested``: configured through a holder of the GPT-2, which is returned."""
    outer, prefix = (_Holder(), "lm.") if nested else (tied_gpt2(), "")
    ranks = {f"{prefix}transformer.h.0.attn.c_attn": 3, f"{prefix}transformer.h.1.attn.c_attn": 1}
    lorambo.configure_model(outer, ranks, capacity=4, modules_to_save=[head])
    model = outer.lm if nested else outer
    lora_layers(model)["transformer.h.0.attn.c_attn"].set_rank(2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            r = layer.rank
            layer.lora_A[:r] = torch.randn(layer.lora_A[:r].shape, generator=g, dtype=torch.float64)
            layer.lora_B[:, :r] = torch.randn(layer.lora_B[:, :r].shape, generator=g, dtype=torch.float64) * 0.2
        trained = dict(model.named_parameters(remove_duplicate=False))[WEIGHT[head]]
        trained.add_(torch.randn(trained.shape, generator=g, dtype=torch.float64))
    return model


def _reference(model, head):
    """The plain model with the adapters written into its weights and the trained weight given to
    ``head`` alone (the other module keeps the base weight)."""
    plain = tied_gpt2()
    own = dict(model.named_parameters(remove_duplicate=False))[WEIGHT[head]].detach()
    base = plain.transformer.wte.weight.detach().clone()
    plain.lm_head.weight = nn.Parameter(own.clone() if head == "lm_head" else base)
    plain.transformer.wte.weight = nn.Parameter(own.clone() if head == "wte" else base)
    for name, layer in lora_layers(model).items():
        r = layer.rank
        delta = layer.scaling * layer.lora_B[:, :r].detach() @ layer.lora_A[:r].detach()  # [out, in]
        conv = plain.get_submodule(name)
        conv.weight = nn.Parameter(conv.weight.detach() + delta.T)  # Conv1D holds [in, out]
    with torch.no_grad():
        return plain(input_ids=IDS).logits


@pytest.mark.parametrize("nested", [False, True], ids=["top", "in-a-submodule"])
@pytest.mark.parametrize("head", ["lm_head", "wte"])
def test_tie_weights_keeps_the_trained_copy_of_a_tied_module_to_save(head, nested):
    model = _trained(head, nested)
    expected = _reference(model, head)
    trained = dict(model.named_parameters(remove_duplicate=False))[WEIGHT[head]]
    # transformers' cached tie mapping (read by its loading and device-map code) drops the pair too
    assert model.all_tied_weights_keys == {}
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params[WEIGHT[head]] is trained and trained.requires_grad
    assert params["lm_head.weight"] is not params["transformer.wte.weight"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-10)


def test_resize_token_embeddings_keeps_the_trained_head():
    model = _trained("lm_head")
    expected = _reference(model, "lm_head")
    head = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(70)
    assert model.lm_head.weight.shape == (70, 32) and model.transformer.wte.weight.shape == (70, 32)
    assert model.lm_head.weight is not model.transformer.wte.weight and model.lm_head.weight.requires_grad
    torch.testing.assert_close(model.lm_head.weight[:64].detach(), head, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits[..., :64], expected, rtol=0, atol=1e-10)

"""transformers' gradient checkpointing recomputes LoRAMBoLinear in the backward pass: with LoRA
dropout the recomputation must draw the same mask, so the gradients equal those of the plain
model run with the same seed (a different mask changes them at the 1e-1 level)."""

import copy

import pytest
import torch
from test_transformers_models import tiny_gpt2, tiny_llama

from lorambo import configure_model, lora_layers


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("build,targets", [(tiny_gpt2, None), (tiny_llama, ["q_proj", "v_proj", "down_proj"])])
def test_checkpointed_gradients_equal_the_plain_ones_with_lora_dropout(build, targets, use_reentrant, backend):
    torch.manual_seed(0)
    model = configure_model(build(), 4, target_modules=targets, dropout=0.3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, : layer.rank].normal_(std=0.05)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())  # really on
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for net in (model, checkpointed):
        net.train()
        torch.manual_seed(2)  # the same dropout masks, base model's and LoRA's
        net(input_ids=ids).logits.float().square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys() and len(plain) == 2 * len(lora_layers(model))
    for name, grad in plain.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_of_an_image_model_needs_input_require_grads():
    """transformers makes the embedding output require grad for ``input_ids`` models only. With
    reentrant checkpointing of an image model (ViT, ``pixel_values``) whose base is frozen, no
    input of a checkpointed block requires grad, so its LoRA pools get no gradient (torch warns);
    ``model.enable_input_require_grads()`` gives the gradients of the model without
    checkpointing (docs/interop.md)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=48, num_labels=3,
                                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model = configure_model(vit.double(), 3, capacity=4, modules_to_save=["classifier"])
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, : layer.rank].normal_(std=0.05)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2])

    def grads(net):
        net.train()
        net(pixel_values=pixels, labels=labels).loss.backward()
        return {n: p.grad for n, p in net.named_parameters() if p.requires_grad}

    plain = grads(copy.deepcopy(model))
    frozen_inputs = copy.deepcopy(model)
    frozen_inputs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        lost = grads(frozen_inputs)
    assert all(lost[n] is None for n in plain if "lora_" in n)
    fixed = copy.deepcopy(model)
    fixed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    fixed.enable_input_require_grads()
    recomputed = grads(fixed)
    assert len(plain) == 2 * len(lora_layers(model)) + 2
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-10, atol=1e-12, msg=name)

"""At one uniform rank lorambo is LoRA: peft and lorambo, started from the same A and B, trained on
the same data with the same optimizer, agree in float64 after several steps (outputs, every LoRA
weight, the modules to save), and the unused slots of the pools stay exactly zero."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2ForSequenceClassification

import lorambo
from lorambo import configure_model, lora_layers

TARGETS = ["c_attn", "c_fc", "c_proj"]


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=3, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)
    return GPT2ForSequenceClassification(cfg).double()  # Conv1D targets: peft's fan_in_fan_out


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    adamw = lorambo.optim.AdamW if kind == "lorambo_adamw" else torch.optim.AdamW
    return adamw(params, lr=1e-2, weight_decay=0.1, amsgrad=kind == "adamw_amsgrad")


@pytest.mark.parametrize("kind", ["adamw_amsgrad", "sgd", "lorambo_adamw"])
@pytest.mark.parametrize("alpha,rslora", [(6.0, False), (3.0, True)])
def test_peft_and_lorambo_train_alike(kind, alpha, rslora):
    r = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out set to True for Conv1D
        theirs = get_peft_model(_gpt2(), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS,
                                                    fan_in_fan_out=True, modules_to_save=["score"],
                                                    init_lora_weights=False))
    ours = configure_model(_gpt2(), r, target_modules=TARGETS, alpha=alpha, use_rslora=rslora,
                           modules_to_save=["score"])
    peft_layers = {n: theirs.base_model.model.get_submodule(n) for n in lora_layers(ours)}
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora_A[:r].copy_(peft_layers[name].lora_A["default"].weight)
            layer.lora_B[:, :r].copy_(peft_layers[name].lora_B["default"].weight)
    g = torch.Generator().manual_seed(1)
    runs, norms = [], []
    for model in (theirs, ours):
        params = [p for p in model.parameters() if p.requires_grad]
        runs.append((model, params, _optimizer(kind, params)))
    for _ in range(4):
        ids, labels = torch.randint(1, 64, (3, 8), generator=g), torch.randint(0, 3, (3,), generator=g)
        for model, params, optimizer in runs:
            optimizer.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.5)))
            optimizer.step()
    assert max(norms) > 0.5  # the clipping acts
    ids = torch.randint(1, 64, (4, 8), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-12, atol=1e-12)
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.lora_A[:r].detach(), peft_layers[name].lora_A["default"].weight.detach(),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.lora_B[:, :r].detach(), peft_layers[name].lora_B["default"].weight.detach(),
                                   rtol=1e-12, atol=1e-12)
        assert layer.capacity > r and not layer.lora_A[r:].any() and not layer.lora_B[:, r:].any()
    torch.testing.assert_close(ours.score.weight.detach(),
                               theirs.base_model.model.score.modules_to_save["default"].weight.detach(),
                               rtol=1e-12, atol=1e-12)

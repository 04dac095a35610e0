"""``save_pretrained`` of a model whose adapted output head is tied to the input embedding (GPT-2's
``lm_head`` as a LoRA target), as Trainer saves every checkpoint. transformers keeps one copy of
a tied weight only under a key the model declares tied (``lm_head.weight``); wrapped, the head's
weight is ``lm_head.base_layer.weight``, under which the save would raise "shared tensors ... not
properly defined". It writes one copy, and the checkpoint loads back into the rebuilt model with
the tie and the adapter's function."""

import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lorambo import configure_model, lora_layers

TARGETS = ["c_attn", "lm_head"]


def _base():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=39)).double().eval()


def _adapted(rank):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "configure_model: the base weight of 'lm_head' is tied")
        return configure_model(_base(), rank, target_modules=TARGETS, capacity=4)


def _expected_logits(model, ids):
    """Float64 logits of the plain model with W + s B_r A_r written in; the head gets a weight of
    its own, so the embedding keeps the base weight."""
    plain = _base()
    for name, layer in lora_layers(model).items():
        r = layer.rank
        delta = layer.scaling * layer.lora_B[:, :r].detach() @ layer.lora_A[:r].detach()  # [out, in]
        module = plain.get_submodule(name)
        weight = module.weight.detach() + (delta if isinstance(module, nn.Linear) else delta.T)
        module.weight = nn.Parameter(weight)
    return plain(ids).logits


@pytest.mark.parametrize("shard", [None, "2KB"])
def test_a_tied_adapted_head_saves_one_copy_and_loads_back(tmp_path, shard):
    model = _adapted(1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.set_rank(3)
            layer.lora_B[:, :3].copy_(torch.randn(layer.out_features, 3, generator=g, dtype=torch.float64))
    model.save_pretrained(tmp_path, **({} if shard is None else {"max_shard_size": shard}))
    saved = {}
    for file in tmp_path.glob("*.safetensors"):
        saved.update(load_file(file))
    assert "transformer.wte.weight" in saved and "lm_head.base_layer.weight" not in saved

    rebuilt = _adapted(1)
    with torch.no_grad():  # nothing of the rebuilt model's own values may survive the load
        rebuilt.transformer.wte.weight.zero_()
    for file in sorted(tmp_path.glob("*.safetensors")):
        result = rebuilt.load_state_dict(load_file(file), strict=False)
        assert not result.unexpected_keys
    assert rebuilt.lm_head.base_layer.weight is rebuilt.transformer.wte.weight
    assert torch.equal(rebuilt.transformer.wte.weight, model.transformer.wte.weight)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rebuilt(ids).logits, _expected_logits(model, ids), rtol=1e-12, atol=1e-12)

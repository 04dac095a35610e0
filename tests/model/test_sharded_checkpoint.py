"""A sharded ``save_pretrained`` of an adapted model (a big model's checkpoint, which Trainer
resumes through transformers' ``load_sharded_checkpoint``) loads into the model rebuilt with its
first ranks, whatever the shard order: a layer's pools and its ``_extra_state`` may sit in
different shards, and the shards load one ``load_state_dict(strict=False)`` at a time, in the
order of a set of file names."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from lorambo import configure_model, lora_layers


def _plain():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=39)).double().eval()


def _rebuilt():
    """The model as a resumed run rebuilds it: the same base, every layer at its first rank 1."""
    return configure_model(_plain(), 1, target_modules=["c_attn", "c_fc"], capacity=4)


def _trained():
    """Ranks grown (3) and shrunk (0) since the start, pools non-zero in every active slot."""
    model = _rebuilt()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(lora_layers(model).values()):
            layer.set_rank(3 if i % 2 == 0 else 0)
            layer.lora_B[:, :layer.rank].copy_(torch.randn(layer.out_features, layer.rank, generator=g,
                                                           dtype=torch.float64))
    return model


def _expected_logits(model, ids):
    """Float64 logits of the plain model with every adapted layer's s B_r A_r added to its weight."""
    plain = _plain()
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            r = layer.rank
            delta = layer.scaling * layer.lora_B[:, :r] @ layer.lora_A[:r]
            plain.get_submodule(name).weight.add_(delta.T)  # Conv1D keeps [in, out]
    return plain(ids).logits


@pytest.mark.parametrize("order", ["saved", "reversed"])
def test_a_sharded_checkpoint_loads_in_any_shard_order(tmp_path, order):
    """Pools loaded in a shard before their _extra_state were refused (no extra state, so the
    rank-1 layer would have dropped slots 1 and 2): Trainer could not resume such a checkpoint."""
    trained = _trained()
    trained.save_pretrained(tmp_path, max_shard_size="2KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    split = [n for n in lora_layers(trained) if weight_map[f"{n}._extra_state"] != weight_map[f"{n}.lora_A"]]
    # the case under test: a grown layer's pools and its rank in different shards
    assert any(trained.get_submodule(n).rank == 3 for n in split)
    model = _rebuilt()
    for shard in sorted(set(weight_map.values()), reverse=order == "reversed"):  # as load_sharded_checkpoint
        model.load_state_dict(load_file(tmp_path / shard), strict=False)
    assert {n: m.rank for n, m in lora_layers(model).items()} == {n: m.rank for n, m in lora_layers(trained).items()}
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids).logits, _expected_logits(trained, ids), rtol=1e-12, atol=1e-12)

"""An adapted model and accelerate's big-model tools.

Offloading (``cpu_offload``, 'cpu'/'disk' in a device_map) leaves the base weight on the meta
device and attaches a hook that brings it in only when the base layer itself is called, which
LoRAMBoLinear never does (it computes x W^T + b from the weight). The forward's refusal names the
offloading that caused it, not only a device mix ("move the input or the layer to one device").
Big-model loading takes the merged plain checkpoint."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorambo import configure_model, lora_layers, unload

accelerate = pytest.importorskip("accelerate")


def test_offloaded_base_layer_is_refused_naming_the_offloading():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         bos_token_id=0, eos_token_id=63)).eval()
    model = accelerate.cpu_offload(configure_model(model, ranks=4, capacity=8), execution_device=torch.device("cpu"))
    ids = torch.randint(1, 63, (1, 5), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj': input is on cpu but the base "
                                         r"weight is on meta.*accelerate's hook \(offloaded by cpu_offload.*"
                                         r"merge and unload the adapters"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_big_model_loading_takes_the_merged_plain_checkpoint_not_the_adapted_one(tmp_path):
    """What docs/model.md says about accelerate's load_checkpoint_and_dispatch: it refuses an adapted
    model's checkpoint (``_extra_state`` is neither a parameter nor a buffer); the merged plain
    checkpoint loads into an empty plain model and generates the adapted model's tokens."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=63)
    torch.manual_seed(0)
    model = configure_model(LlamaForCausalLM(config).eval(), ranks=4, capacity=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :layer.rank].normal_(std=0.5)
    model.save_pretrained(tmp_path / "adapted")
    with accelerate.init_empty_weights():
        empty = configure_model(LlamaForCausalLM(config).eval(), ranks=4, capacity=8)
    with pytest.raises(ValueError, match="_extra_state"):
        accelerate.load_checkpoint_and_dispatch(empty, tmp_path / "adapted", device_map={"": "cpu"})

    unload(copy.deepcopy(model), merge=True).save_pretrained(tmp_path / "merged")
    with accelerate.init_empty_weights():
        plain = LlamaForCausalLM(config).eval()
    plain = accelerate.load_checkpoint_and_dispatch(plain, tmp_path / "merged", device_map={"": "cpu"})
    ids = torch.randint(1, 63, (2, 5), generator=torch.Generator().manual_seed(1))
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(plain.generate(ids, **settings), model.generate(ids, **settings))

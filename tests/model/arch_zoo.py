"""Tiny random transformers models, one per architecture family lorambo is tested on.

``build(name, dtype)`` returns ``(model, batch)``. Every class is in each transformers lorambo
supports (>= 5.0, lorambo/optional.py): a missing one fails the test instead of skipping it. MoE experts run grouped matmuls that torch's CPU
kernels take in float32 only, so ``DTYPES`` runs those models in float32.
"""

import pytest
import torch
import transformers

V = 64
_DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)
_ENC = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40)
_MOE = dict(_DEC, num_experts_per_tok=2)

# name: (model class, config class, config kwargs)
SPECS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _DEC),
    "mistral": ("MistralForCausalLM", "MistralConfig", _DEC),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_DEC, head_dim=8)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_DEC, head_dim=8)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_DEC, pad_token_id=0)),  # fused qkv_proj, gate_up_proj
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_DEC, num_key_value_heads=4)),
    "bert": ("BertForSequenceClassification", "BertConfig", dict(_ENC, num_labels=3)),
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(_ENC, pad_token_id=1)),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=32)),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)),
    "bart": ("BartForConditionalGeneration", "BartConfig",
             dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)),
    "vit": ("ViTForImageClassification", "ViTConfig",
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
                 patch_size=8, num_labels=3)),
    # parents that read a child's weight directly: MobileBERT's LM head (dense), Mamba (dt_proj, ...)
    "mobilebert": ("MobileBertForMaskedLM", "MobileBertConfig",
                   dict(_ENC, embedding_size=16, intermediate_size=32, intra_bottleneck_size=16, true_hidden_size=16)),
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, state_size=4,
                                                      expand=2, conv_kernel=3, time_step_rank=4)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(_MOE, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  dict(_MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24)),
}
MOE = ("mixtral", "qwen2_moe")
NAMES = list(SPECS)


def dtype_of(name: str) -> torch.dtype:
    return torch.float32 if name in MOE else torch.float64


def build(name: str, seed: int = 0):
    """``(model in eval mode, batch dict)``, seeded."""
    model_cls, config_cls, kwargs = SPECS[name]
    model_cls, config_cls = getattr(transformers, model_cls, None), getattr(transformers, config_cls, None)
    if model_cls is None or config_cls is None:
        pytest.fail(f"transformers {transformers.__version__} has no {SPECS[name][0]} / {SPECS[name][1]}")
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).to(dtype_of(name)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    if name == "vit":
        return model, {"pixel_values": torch.randn(2, 3, 16, 16, generator=g, dtype=dtype_of(name))}
    batch = {"input_ids": torch.randint(2, V, (2, 8), generator=g)}
    if name in ("t5", "bart"):
        batch["decoder_input_ids"] = torch.randint(2, V, (2, 5), generator=g)
    return model, batch


def logits(model, batch) -> torch.Tensor:
    return model(**batch).logits

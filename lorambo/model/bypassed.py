"""Linear layers whose parent reads their weight instead of calling them.

``LoRAMBoLinear`` adds its branch when it is called. A parent that reads ``child.weight`` and
multiplies by it itself (or hands it to a fused kernel) gets the base weight only: a LoRA there
would never run, and merging it would change the output it never changed while training. Such
layers are left out of the default targets and refused by name.
"""

from __future__ import annotations

from torch import nn

__all__ = ["bypassed_linears"]

# parent class name (transformers) -> the children whose weight its code reads directly
_WEIGHT_READERS = {
    "MobileBertLMPredictionHead": ("dense",),  # matmul with cat([decoder.weight.t(), dense.weight])
    # Mamba: dt_proj.weight @ time_step; the fused CUDA training kernel (mamba_inner_fn) takes
    # x_proj, dt_proj and out_proj weights
    "MambaMixer": ("x_proj", "dt_proj", "out_proj"),
    "FalconMambaMixer": ("x_proj", "dt_proj", "out_proj"),
    "JambaMambaMixer": ("dt_proj",),
    # Mamba-2 mixers: the fused CUDA training kernel takes outproj_weight=out_proj.weight
    "Mamba2Mixer": ("out_proj",),
    "NemotronHMamba2Mixer": ("out_proj",),
    "BambaMixer": ("out_proj",),
    "GraniteMoeHybridMambaLayer": ("out_proj",),
    "Zamba2MambaMixer": ("out_proj",),
    "FalconH1Mixer": ("out_proj",),
    "WavLMAttention": ("q_proj", "k_proj", "v_proj", "out_proj"),  # F.multi_head_attention_forward
    "DisentangledSelfAttention": ("in_proj",),  # DeBERTa (v1): in_proj.weight.chunk(...) for given queries
    "DetrMHAttentionMap": ("k_proj",),  # conv2d with k_proj.weight
    "ConditionalDetrMHAttentionMap": ("k_proj",),
    "MaskFormerDetrMHAttentionMap": ("k_proj",),
}

# BLOOM with pretraining_tp > 1 and slow_but_exact: parent class name -> the child whose weight
# its forward slices
_BLOOM_SLICED = {"BloomAttention": ("dense",), "BloomMLP": ("dense_4h_to_h",)}


def _readers(module: nn.Module) -> tuple[str, ...]:
    if isinstance(module, nn.MultiheadAttention):  # passes out_proj.weight to F.multi_head_attention_forward
        return ("out_proj",)
    if type(module).__name__ in _BLOOM_SLICED and getattr(module, "pretraining_tp", 1) > 1 \
            and getattr(module, "slow_but_exact", False):  # F.linear on column slices of the weight
        return _BLOOM_SLICED[type(module).__name__]
    return _WEIGHT_READERS.get(type(module).__name__, ())


def bypassed_linears(model: nn.Module) -> dict[str, str]:
    """``{name: parent class}`` of the children whose parent reads their weight directly
    (``nn.MultiheadAttention``'s ``out_proj``, Mamba's ``dt_proj``, MobileBERT's LM head
    ``dense``, ...), for those children the model has."""
    out = {}
    for name, module in model.named_modules():
        children = dict(module.named_children())
        for child in _readers(module):
            if child in children:
                parent = "nn.MultiheadAttention" if isinstance(module, nn.MultiheadAttention) else type(module).__name__
                out[f"{name}.{child}" if name else child] = parent
    return out

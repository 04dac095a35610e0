"""Which tokens of a padded batch are real, for statistics that read a layer's input directly.

Statistics of the inputs X alone (``data_covariance``) see every position a padded batch feeds
the layer, pads included: pads are real vectors after the embeddings, so counting them makes
the same sentences give other results padded to another length or side. Gradient-based
statistics need no mask when the loss ignores pads (their output gradient is then 0).

``token_mask`` is what the estimators accept:
- ``"auto"``: a Mapping batch's ``"attention_mask"`` (Hugging Face tokenizers' output), every
  token for batches without one;
- a callable ``batch -> [B, T]`` tensor (nonzero = real token), e.g. for batches of raw texts
  that ``loss_fn`` tokenizes itself;
- ``None``: every token counts.

Statistics gathered by hooks during training (online growth's activation capture, FisherProxy's
``reduction="token_mean"``) take the mask the same way from the batch they are given, or from
the keyword arguments of the model call (``model(**batch)``, as Trainer calls it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

__all__ = ["TokenMask", "batch_token_mask", "check_token_mask", "mask_selects_rows", "real_tokens"]

# For type checkers: the token_mask settings of the estimators and LoRAMBoOptimizer (module doc).
TokenMask = Literal["auto"] | Callable[[Any], torch.Tensor] | None


def check_token_mask(token_mask, who: str) -> None:
    """ValueError unless ``token_mask`` is one of the settings of the module doc."""
    if not (token_mask is None or (isinstance(token_mask, str) and token_mask == "auto") or callable(token_mask)):
        raise ValueError(f"{who}: token_mask must be 'auto', a callable(batch) -> [B, T] mask or None, "
                         f"got {token_mask!r}")


def batch_token_mask(token_mask, batch, who: str) -> torch.Tensor | None:
    """The [B, T] bool mask of ``batch`` under the ``token_mask`` setting (see module doc)."""
    check_token_mask(token_mask, who)
    if token_mask is None:
        return None
    if isinstance(token_mask, str):
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if mask is None:
            return None
    else:
        mask = token_mask(batch)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{who}: the token mask must be a [batch, tokens] tensor, got {shape}")
    return mask != 0


def mask_selects_rows(shape, mask: torch.Tensor, layer: str, who: str) -> bool:
    """Whether the mask [B, T] picks rows of a layer input of ``shape`` [..., in]: True when the
    input's leading dims are the mask's; False for a 2-D input [B, in], which holds one row per
    example (e.g. a pooler on the first token) and is kept whole. Any other shape is a ValueError
    naming the layer and both shapes: which rows are pads cannot be told."""
    shape = tuple(shape)
    if shape[:-1] == tuple(mask.shape):
        return True
    if len(shape) == 2 and shape[0] == mask.shape[0]:
        return False
    raise ValueError(f"{who}: layer {layer!r} gets an input of shape {shape}, whose leading "
                     f"dims do not match the token mask's {tuple(mask.shape)}; pass token_mask=None "
                     "to count every position, or a token_mask callable matching this layout")


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None, layer: str, who: str) -> torch.Tensor:
    """Rows of ``x`` [..., in] that are real tokens, as [n, in] (which rows: see
    :func:`mask_selects_rows`)."""
    if mask is not None and mask_selects_rows(x.shape, mask, layer, who):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])

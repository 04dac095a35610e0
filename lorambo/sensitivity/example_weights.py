"""Per-example gradient scales c_n = N / N_n of a loss averaged over the real tokens of a batch.

Such a loss (Hugging Face's with ``labels``) is sum_n (N_n / N) L_n, L_n example n's own token
mean: the gradient a layer sees for example n is (N_n / N) dL_n/dW. FisherProxy's
``reduction="token_mean"`` multiplies it back by N / N_n. The counts come from the token mask
of each model call (a forward pre-hook with kwargs: the call's keyword arguments are the batch).
"""

from __future__ import annotations

import torch

from .token_mask import batch_token_mask

__all__ = ["ExampleWeights"]


class ExampleWeights:
    """c_n^2 = (N / N_n)^2 of the latest model call, [B] float64 on the mask's device (no host
    sync); 0 for an example without real tokens (its gradient is 0 anyway)."""

    def __init__(self, token_mask):
        self.token_mask = token_mask
        self._mask: torch.Tensor | None = None
        self._squared: torch.Tensor | None = None

    def observe(self, module, args, kwargs) -> None:
        """Forward pre-hook of the model: read the token mask of the call's batch. A call without
        grad (an evaluation forward) records nothing, so it keeps the mask of the last training
        call: the layers that reentrant activation checkpointing recomputes in that call's
        backward read it then."""
        if not torch.is_grad_enabled():
            return
        mask = batch_token_mask(self.token_mask, kwargs, "FisherProxy(reduction='token_mean')")
        if mask is None:
            raise ValueError("FisherProxy(reduction='token_mean') needs the token mask of every model call: "
                             f"this call's keyword arguments {sorted(kwargs)} have no attention_mask; call "
                             "model(**batch) with one, or pass token_mask=callable(kwargs) -> [B, T] mask")
        counts = mask.sum(1, dtype=torch.float64)                               # (B,) N_n
        scale = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts))
        self._mask, self._squared = mask, scale.square()

    def squared(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        """c_n^2 for the examples of layer input ``x`` (leading dim B), ValueError naming the
        layer and the shapes when there is no mask yet or it has another batch size."""
        if self._mask is None:
            raise ValueError(f"FisherProxy(reduction='token_mean'): layer {layer!r} ran before any call of the "
                             "model itself, so no token mask was seen; run the model, not the layer alone")
        if x.dim() < 2 or x.shape[0] != self._mask.shape[0]:
            raise ValueError(f"FisherProxy(reduction='token_mean'): layer {layer!r} gets an input of shape "
                             f"{tuple(x.shape)}, whose examples (leading dim) do not match the token mask's "
                             f"{tuple(self._mask.shape)}")
        return self._squared

    def clear(self) -> None:
        """Drop the latest call's mask and scales (device tensors) once no call is observed."""
        self._mask = self._squared = None

"""Warn when a rank change grows a layer whose ``lora_B`` is frozen: its new slots cannot train.

A new slot starts with B = 0 (function preservation, docs/architecture.md), so while ``lora_B``
does not require grad the slot adds nothing and its row of A gets a zero gradient (``Bᵀ dY``
over a zero column): the parameters it takes stay unused until ``lora_B`` trains again. Online
growth, rank moves and ALoRA rounds leave such layers alone (``lorambo/allocation/frozen.py``);
an explicit ``set_rank`` (or ``configure_model``'s rank change) warns. Loaders, which overwrite
every new slot with saved values, grow under :func:`values_follow`, which silences it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from lorambo.user_warnings import warn_user

__all__ = ["values_follow", "warn_if_frozen_growth"]

_OVERWRITTEN: ContextVar[bool] = ContextVar("lorambo_growth_overwritten", default=False)


@contextmanager
def values_follow() -> Iterator[None]:
    """Growth inside the block is overwritten with saved values next: no warning."""
    token = _OVERWRITTEN.set(True)
    try:
        yield
    finally:
        _OVERWRITTEN.reset(token)


def warn_if_frozen_growth(layer, old: int, new: int) -> None:
    """Warn if ``layer`` (a LoRAMBoLinear) grows from ``old`` to ``new`` with ``lora_B`` frozen."""
    if new > old and not layer.lora_B.requires_grad and not _OVERWRITTEN.get():
        warn_user(f"{layer._label}: rank {old} -> {new} grows a layer whose lora_B is frozen (requires_grad=False): "
                  "a new slot starts with B = 0, so it stays zero and its row of A gets no gradient until "
                  "lora_B trains again; the parameters it takes are unused. Unfreeze lora_B "
                  "(layer.lora_B.requires_grad_(True)) before growing, or leave this layer's rank as it is.",
                  UserWarning)

"""lorambo's per-layer allocation as a ``peft.LoraConfig`` for people who train with peft.

peft has one rank and alpha per config plus ``rank_pattern`` / ``alpha_pattern``; its scaling
is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). lorambo's scaling is ``alpha / rank`` fixed
when a layer is built (alpha defaults to the rank, i.e. scaling 1). The patterns below give each
layer the alpha that makes peft's scaling equal lorambo's:

- from ``{name: rank}`` (a fresh allocation): ``alpha_i`` = the alpha lorambo would use
  (``alpha``, or ``alpha_pattern``'s value, or the rank itself when both are None), with the
  same ``use_rslora``: the formulas then coincide;
- from a model with LoRAMBoLinear layers (ranks may have grown since construction):
  ``alpha_i = scaling_i * rank_i`` and ``use_rslora=False``, which reproduces the fixed scaling.

Targets are the exact names (an escaped regex, which peft full-matches); rank-0 layers are left
out. Pattern keys are the full names, longest first, so no key claims a longer name.
"""

from __future__ import annotations

import numbers
import re
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from lorambo.model import lora_layers
from lorambo.model.patterns import pattern_lookup
from lorambo.model.unwrap import unwrap_model
from lorambo.nn.finite_numbers import is_finite_number, shown_number
from lorambo.optional import requires

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["peft_config"]


def _entries(ranks, alpha, alpha_pattern, use_rslora) -> tuple[dict[str, tuple[int, float]], bool]:
    """``{name: (rank, peft alpha)}`` for every layer with rank > 0, and peft's use_rslora."""
    if isinstance(ranks, nn.Module):
        if alpha is not None or alpha_pattern is not None or use_rslora:
            raise ValueError("peft_config(model): alpha, alpha_pattern and use_rslora come from the "
                             "model's layers; pass them only with a {name: rank} dict")
        layers = lora_layers(unwrap_model(ranks))  # a compiled / DDP model: the plain names
        if not layers:
            raise ValueError(f"{type(ranks).__name__} has no LoRAMBoLinear layer")
        return {n: (m.rank, m.scaling * m.rank) for n, m in layers.items() if m.rank > 0}, False
    if not isinstance(ranks, Mapping) or not ranks:
        raise TypeError(f"ranks must be a non-empty {{name: rank}} dict or a model, got {ranks!r}")
    out = {}
    alpha_of = pattern_lookup(alpha_pattern, alpha)
    for name, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
            raise ValueError(f"rank of {name!r} is {r!r}: must be an int >= 0")
        r = int(r)  # numpy ints too, as configure_model takes them; LoraConfig must hold plain ints (JSON)
        a = alpha_of(name)
        if a is not None and not is_finite_number(a):
            # LoRAMBoLinear refuses it too; peft would write it out as the non-JSON token NaN
            raise ValueError(f"peft_config: alpha of {name!r} is {shown_number(a)}: must be a finite number")
        if r > 0:
            out[name] = (r, float(a) if a is not None else float(r))
    return out, bool(use_rslora)


def peft_config(ranks: Mapping[str, int] | nn.Module, alpha: float | None = None,
                alpha_pattern: Mapping[str, float] | None = None, use_rslora: bool = False, dropout: float = 0.0,
                **lora_config_kwargs: Any) -> LoraConfig:
    """A ``peft.LoraConfig`` realising ``ranks`` with lorambo's scaling.

    Args:
        ranks: ``{module name: rank}`` (e.g. ``LoRAMBoOptimizer.compute_optimal_ranks()``), or a
            model with LoRAMBoLinear layers (its current ranks and scalings).
        alpha, alpha_pattern, use_rslora: as in :func:`lorambo.configure_model`.
        dropout: ``lora_dropout``.
        **lora_config_kwargs: passed on to ``LoraConfig`` (e.g. ``task_type``, ``modules_to_save``).

    Raises ``TypeError`` for ``ranks`` that is neither a non-empty dict nor a model (and for a
    keyword ``LoraConfig`` does not take), ``ValueError`` for a negative rank, a non-finite
    alpha, every rank 0, or a keyword the allocation sets (``r``, ``target_modules``, ...),
    ``ImportError`` without peft.
    """
    with requires("peft", "peft_config"):
        from peft import LoraConfig

    entries, rslora = _entries(ranks, alpha, alpha_pattern, use_rslora)
    if not entries:
        raise ValueError("every rank is 0: nothing for peft to adapt")
    by_length = sorted(entries, key=len, reverse=True)
    rank_pattern = {n: entries[n][0] for n in by_length}
    alpha_by_name = {n: entries[n][1] for n in by_length}
    r_default = Counter(rank_pattern.values()).most_common(1)[0][0]
    alpha_default = next(alpha_by_name[n] for n in entries if rank_pattern[n] == r_default)
    for key in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora"):
        if key in lora_config_kwargs:
            raise ValueError(f"peft_config: {key} is set from the allocation; do not pass it")
    return LoraConfig(r=r_default, lora_alpha=alpha_default,
                      target_modules="(" + "|".join(re.escape(n) for n in entries) + ")",
                      rank_pattern=rank_pattern, alpha_pattern=alpha_by_name, use_rslora=rslora,
                      lora_dropout=dropout, **lora_config_kwargs)

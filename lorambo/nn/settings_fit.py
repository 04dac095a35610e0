"""Whether a layer's scaling and dropout survive the dtype it computes in.

(The values an adapter file loads are checked against the model's dtype by
lorambo/adapters/values_fit.py.)

The ops multiply the LoRA branch by the scaling and the kept dropout inputs by ``1 / (1 - p)``
in the compute dtype. A scaling that rounds to 0 there makes the adapter add nothing and get no
gradient; one that rounds to inf, or a dropout scale that does (p >= 1 - 1/65520 in float16), makes
the outputs inf. A setting fine in float32 can fail in float16, and the dtype changes after the
layer is built (``.half()``, ``.to(dtype)``, autocast) as the settings do (``load_state_dict``,
``load_adapter``, peft import), so every place that makes the combination calls
:func:`check_settings_fit`: the constructor, the loads (before they change anything) and the
forward (for the conversions, which give a module no hook before they act).

The forward runs it on every call, also under torch.compile (``fullgraph=True``), so it is
plain Python on floats: the rounding bounds of each floating dtype are computed once here.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_settings_fit"]


def _bounds(dtype: torch.dtype) -> tuple[float, float]:
    """``(zero_to, inf_from)``: a magnitude <= zero_to rounds to 0 in ``dtype``, one >= inf_from to
    inf (round to nearest, ties to even: half the smallest subnormal rounds to 0, and the midpoint
    between the largest finite value and the next power of the format rounds up)."""
    info = torch.finfo(dtype)
    smallest = info.smallest_normal * info.eps  # the smallest subnormal
    _, exponent = math.frexp(info.max)  # max = m * 2**exponent, 0.5 <= m < 1
    half_ulp = info.eps * 2.0 ** (exponent - 1) / 2
    try:
        inf_from = info.max + half_ulp
    except OverflowError:
        inf_from = math.inf
    return smallest / 2, inf_from if inf_from > info.max else math.inf  # float64: max + half an ulp is max


_BOUNDS = {dtype: _bounds(dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def check_settings_fit(label: str, dtype: torch.dtype, scaling: float, dropout: float, where: str = "",
                       alpha: float | None = None) -> None:
    """ValueError naming ``label`` (the layer), the setting and its value unless ``scaling``
    rounds to a nonzero finite ``dtype`` number and so does the dropout scale ``1 / (1 - dropout)``.
    ``where``: how the layer came to compute in ``dtype`` (" (under autocast)"), and ``alpha``, the
    setting the scaling came from, for the message."""
    bounds = _BOUNDS.get(dtype)
    if bounds is None:  # a dtype the layer refuses elsewhere
        return
    zero_to, inf_from = bounds
    if not zero_to < abs(scaling) < inf_from:
        result = "0 (the adapter would add nothing)" if abs(scaling) <= zero_to else "inf"
        came_from = "" if alpha is None else f" (alpha={alpha!r})"
        raise ValueError(f"{label}: scaling {scaling!r}{came_from} rounds to {result} in {dtype}{where}, the dtype "
                         "the layer computes in; give an alpha whose scaling (alpha / rank, alpha / sqrt(rank) with "
                         f"rsLoRA) is a nonzero finite {dtype} number, or compute in a wider dtype")
    if dropout > 0.0 and 1.0 / (1.0 - dropout) >= inf_from:
        raise ValueError(f"{label}: dropout {dropout!r} scales the kept inputs by 1 / (1 - p) = "
                         f"{1.0 / (1.0 - dropout):.4g}, which overflows {dtype}{where}, the dtype the layer computes "
                         "in; give a smaller dropout, or compute in a wider dtype")

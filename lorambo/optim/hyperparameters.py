"""The checks of lorambo.optim.AdamW's hyperparameters, for the defaults and for every parameter
group (torch checks the defaults' signs only, and no group's): each a finite number or one-element
tensor in its range, refused with a ValueError naming the argument and the value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lorambo.nn.finite_numbers import is_finite_number, shown_number

__all__ = ["check_adamw_settings"]

WHO = "lorambo.optim.AdamW"


def _value(value) -> float | None:
    """The float of a finite number or a one-element tensor; None for anything else."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype is torch.bool:
            return None
        value = float(value.detach())
    return float(value) if is_finite_number(value) else None


def _shown(value) -> str:
    if torch.is_tensor(value):
        return repr(value.detach()) if value.numel() == 1 else f"a tensor of shape {list(value.shape)}"
    return shown_number(value)


def check_adamw_settings(settings: Mapping) -> None:
    """ValueError, naming lorambo.optim.AdamW, unless ``lr``, ``eps`` and ``weight_decay`` are
    finite and >= 0 and ``betas`` is a pair of finite numbers in [0, 1)."""
    for key in ("lr", "eps", "weight_decay"):
        value = settings.get(key)
        number = _value(value)
        if number is None or number < 0.0:
            raise ValueError(f"{WHO}: {key}={_shown(value)} must be a finite number >= 0 "
                             "(a number or a one-element tensor)")
    betas = settings.get("betas")
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"{WHO}: betas={betas!r} must be a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        number = _value(beta)
        if number is None or not 0.0 <= number < 1.0:
            raise ValueError(f"{WHO}: betas[{i}]={_shown(beta)} must be a finite number in [0, 1)")

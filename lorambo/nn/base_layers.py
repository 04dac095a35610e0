"""Which frozen base layers LoRAMBoLinear can wrap: nn.Linear and transformers' Conv1D."""

from __future__ import annotations

import sys

import torch
from torch import nn


def _conv1d_class():
    # Only look when transformers is already imported: no Conv1D can exist otherwise, and
    # importing transformers costs seconds.
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def base_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', or None when ``module`` cannot be wrapped."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def is_wrappable(module: nn.Module) -> bool:
    return base_kind(module) is not None


def features(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in_features, out_features). Conv1D stores its weight as [in, out]."""
    if kind == "linear":
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def weight_out_in(module: nn.Module, kind: str) -> torch.Tensor:
    """The base weight as an [out, in] tensor (a view for Conv1D, no copy)."""
    return module.weight if kind == "linear" else module.weight.t()

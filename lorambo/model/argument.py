"""The check every model-level function makes of its ``model`` argument first."""

from __future__ import annotations

from torch import nn

__all__ = ["require_module"]


def require_module(model, caller: str) -> None:
    """TypeError naming ``caller`` and the value unless ``model`` is an ``nn.Module``: None or
    ``load_minilm()``'s (model, tokenizer) pair would otherwise fail deep inside as an
    AttributeError that names neither."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch nn.Module, got {type(model).__name__} {model!r:.80}")

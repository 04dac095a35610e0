"""The check every model-level function makes of its ``model`` argument first."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

__all__ = ["require_module", "require_path"]


def require_module(model, caller: str) -> None:
    """TypeError naming ``caller`` and the value unless ``model`` is an ``nn.Module``: None or
    ``load_minilm()``'s (model, tokenizer) pair would otherwise fail deep inside as an
    AttributeError that names neither."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch nn.Module, got {type(model).__name__} {model!r:.80}")


def require_path(path, caller: str) -> Path:
    """``path`` as a Path, else a TypeError (None, a number) or ValueError (an empty name, which
    would mean the current directory: an unset variable would write there) naming ``caller``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{caller}: path must be a file or folder name (str or os.PathLike), got "
                        f"{type(path).__name__} {path!r:.60}")
    if not os.fspath(path).strip():
        raise ValueError(f"{caller}: path is empty (use '.' for the current directory)")
    return Path(path)

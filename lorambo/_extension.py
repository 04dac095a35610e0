"""Optional compiled extension ``lorambo._C``: import once, warn once if it is broken."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

_state: dict[str, object] = {}


def load() -> ModuleType | None:
    """The extension module, or None when it was not built or fails to import (one warning)."""
    if "module" not in _state:
        try:
            _state["module"] = importlib.import_module("lorambo._C")
        except ModuleNotFoundError as err:
            _state["module"], _state["error"] = None, err  # not built: expected, stay quiet
        except Exception as err:  # built but broken (ABI mismatch, missing symbol): say so once
            _state["module"], _state["error"] = None, err
            warnings.warn(f"lorambo._C failed to import ({err}); using Triton/PyTorch", stacklevel=2)
    return _state["module"]  # type: ignore[return-value]


def require() -> ModuleType:
    """The extension, or a RuntimeError explaining why the requested 'ext' backend cannot run."""
    module = load()
    if module is None:
        raise RuntimeError(
            "lorambo backend 'ext' was requested, but the compiled extension lorambo._C is not "
            f"available ({_state.get('error')}); rebuild without LORAMBO_SKIP_EXT=1 or use 'torch'"
        )
    return module

"""Optional compiled extension ``lorambo._C``: import once, warn once if it is broken.

Semantics (kept stable; tests/ext/test_ext_packaging.py checks them):

- *absent* (built with ``LORAMBO_SKIP_EXT=1``, or no compiler at build time): ``load()`` returns
  None quietly. A missing extension is an expected configuration, not a problem to report.
- *broken* (the file exists but does not import: ABI or torch-version mismatch, missing symbol,
  or its fake-impl module fails): ``load()`` returns None and warns **once** per process.
- either way lorambo keeps working on Triton/PyTorch; only an explicit request for the ``ext``
  backend (:func:`require`) raises.

Importing ``lorambo._C`` registers the ``torch.ops.lorambo`` operators; ``lorambo.ext.fake``
adds their fake implementations for torch.compile.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

_state: dict[str, object] = {}


def load() -> ModuleType | None:
    """The extension module, or None when it was not built or fails to import (one warning)."""
    if "module" not in _state:
        try:
            module = importlib.import_module("lorambo._C")
            importlib.import_module("lorambo.ext.fake")
            _state["module"] = module
        except ModuleNotFoundError as err:
            _state["module"], _state["error"] = None, err
            if err.name != "lorambo._C":  # something the extension needs is missing: broken
                warnings.warn(f"lorambo._C failed to import ({err}); using Triton/PyTorch", stacklevel=2)
        except Exception as err:  # built but broken (ABI mismatch, missing symbol): say so once
            _state["module"], _state["error"] = None, err
            warnings.warn(f"lorambo._C failed to import ({err}); using Triton/PyTorch", stacklevel=2)
    return _state["module"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the compiled extension imported (no warning beyond load()'s own)."""
    return load() is not None


def require() -> ModuleType:
    """The extension, or a RuntimeError explaining why the requested 'ext' backend cannot run."""
    module = load()
    if module is None:
        raise RuntimeError(
            "lorambo backend 'ext' was requested, but the compiled extension lorambo._C is not "
            f"available ({_state.get('error')}); rebuild without LORAMBO_SKIP_EXT=1 or use 'torch'"
        )
    return module

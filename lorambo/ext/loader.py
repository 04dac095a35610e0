"""Optional compiled extension ``lorambo._C``: import once, warn once if it is broken.

Semantics (kept stable; tests/ext/test_ext_packaging.py checks them):

- *absent* (built with ``LORAMBO_SKIP_EXT=1``, or no compiler at build time): ``load()`` returns
  None quietly. A missing extension is an expected configuration, not a problem to report.
- *broken* (the file exists but does not import: ABI or torch-version mismatch, missing symbol,
  or its fake-impl module fails): ``load()`` returns None and warns **once** per process.
- *stale* (it imports but lacks an operator this lorambo calls, or was built from other C++/CUDA
  sources than this lorambo's: an older build left in place, e.g. after a rebuild failed or a
  ``git pull`` without one): treated as broken, and the warning names the missing operators or
  the differing source hashes (lorambo/ext/sources.py). The sources are those of the csrc/ next
  to the package (a checkout, an editable install), else the hash the build recorded next to
  the module (a wheel); with neither, only the operators are checked.
- either way lorambo keeps working on Triton/PyTorch; only an explicit request for the ``ext``
  backend (:func:`require`) raises.

Importing ``lorambo._C`` registers the ``torch.ops.lorambo`` operators; ``lorambo.ext.fake``
adds their fake implementations for torch.compile, ``lorambo.ext.flops`` the LoRA op's FLOP
formulas for ``FlopCounterMode``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch

from lorambo.ext.sources import RECORD, sources_hash
from lorambo.user_warnings import warn_user

# the csrc/ of a checkout or editable install this package lives in (absent in a wheel)
CSRC = Path(__file__).resolve().parents[2] / "csrc"

_state: dict[str, object] = {}

# Every operator csrc/ops.cpp defines (tests/ext/test_ext_stale.py keeps the two in step).
OPERATORS = ("multi_dot", "multi_sq_norm", "probe_fill_", "pool_remap_", "pool_adamw_", "scalars_add_",
             "zero_views_", "dropout_mask", "lora_linear", "lora_linear_fwd", "lora_linear_bwd")


def load() -> ModuleType | None:
    """The extension module, or None when it was not built or fails to import (one warning)."""
    if "module" not in _state:
        try:
            module = importlib.import_module("lorambo._C")
            importlib.import_module("lorambo.ext.fake").register_fakes()  # imported earlier, it registered nothing
            _check_operators(module)
            _check_sources(module)
            importlib.import_module("lorambo.ext.flops").register_lora_flop_formulas("lorambo")
            _state["module"] = module
        except ModuleNotFoundError as err:
            _state["module"], _state["error"] = None, err
            if err.name != "lorambo._C":  # something the extension needs is missing: broken
                warn_user(f"lorambo._C failed to import ({err}); using Triton/PyTorch")
        except Exception as err:  # built but broken (ABI mismatch, missing symbol): say so once
            _state["module"], _state["error"] = None, err
            warn_user(f"lorambo._C failed to import ({err}); using Triton/PyTorch")
    return _state["module"]  # type: ignore[return-value]


def _check_operators(module: ModuleType) -> None:
    missing = [name for name in OPERATORS if not hasattr(torch.ops.lorambo, name)]
    if missing:
        raise ImportError(f"{module.__file__} is stale: it lacks the operators {missing} (an older build "
                          "left in place?); " + _rebuild_hint())


def _in_checkout() -> bool:
    """Whether lorambo runs from a checkout (or an editable install of one): lorambo's own csrc/
    header beside the package, so that another package's top-level csrc/ beside an installed
    lorambo is not taken for ours."""
    return (CSRC / "ops.cpp").is_file() and (CSRC / "include" / "lorambo" / "ops.h").is_file()


def _rebuild_hint() -> str:
    """The command that replaces a stale module. pip's default isolated build has no torch
    (pyproject.toml), so it builds no extension, and in a checkout it leaves the stale file in
    place: both commands say --no-build-isolation, as the README and the Makefile do."""
    if _in_checkout():
        return (f"rebuild it in {CSRC.parent} with `pip install --no-build-isolation -e .` (what `make install` "
                "runs) or `python setup.py build_ext --inplace`; without --no-build-isolation pip builds no "
                "extension and leaves the stale file in place")
    return ("reinstall lorambo from its source with `pip install --no-build-isolation .` against the installed "
            "torch; without --no-build-isolation pip builds no extension")


def _expected_sources(module: ModuleType) -> tuple[str, str] | None:
    """(hash, where it comes from) of the sources ``module`` must have been built from."""
    if _in_checkout():  # what a rebuild would compile now
        return sources_hash(CSRC), str(CSRC)
    record = Path(module.__file__).with_name(RECORD)
    if record.is_file():  # a wheel: what its build compiled
        return record.read_text().strip(), str(record)
    return None


def _check_sources(module: ModuleType) -> None:
    expected = _expected_sources(module)
    built = getattr(module, "sources_hash", None)  # None: a build older than the hash
    if expected is not None and built != expected[0]:
        raise ImportError(f"{module.__file__} is stale: built from other sources (hash {built}) than "
                          f"{expected[1]} (hash {expected[0]}); " + _rebuild_hint())


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

"""The ``stacklevel`` of the user's line, for the extension loader's warning.

Every other warning of lorambo goes through ``lorambo.user_warnings.warn_user``; the units of
floor 0 import nothing of each other (docs/architecture.md), so the loader applies the same rule
here: the innermost frame outside lorambo, the libraries that call into it (lorambo_kernels,
torch, transformers, accelerate), ``contextlib`` and ``runpy``; lorambo's own calling line when
every frame is one of those (``python -m lorambo``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

__all__ = ["user_stacklevel"]

_CALLING_BACK = ("lorambo_kernels", "torch", "transformers", "accelerate")


def _folder(path) -> str:
    return str(Path(path).resolve().parent) + os.sep


def _internal_prefixes() -> tuple[str, ...]:
    prefixes = [_folder(Path(__file__).resolve().parent), contextlib.__file__, "<frozen runpy>"]
    runpy = sys.modules.get("runpy")
    if getattr(runpy, "__file__", None):
        prefixes.append(runpy.__file__)
    for package in _CALLING_BACK:  # only those imported: one not imported has no frame
        module = sys.modules.get(package)
        if getattr(module, "__file__", None):
            prefixes.append(_folder(module.__file__))
    return tuple(prefixes)


def _is_internal(filename: str, prefixes: tuple[str, ...]) -> bool:
    if filename.startswith(prefixes):
        return True
    try:  # a relative or symlinked path (PYTHONPATH=., an editable install)
        return os.path.realpath(filename).startswith(prefixes)
    except (OSError, ValueError):
        return False


def user_stacklevel() -> int:
    """The ``stacklevel`` that a ``warnings.warn`` in the function calling this one gives to
    report at the user's line (2, that function's caller, when every frame is internal)."""
    prefixes = _internal_prefixes()
    frame, level = sys._getframe(2), 2  # frame 1 is the warning function: stacklevel 1
    while frame is not None and _is_internal(frame.f_code.co_filename, prefixes):
        frame, level = frame.f_back, level + 1
    return 2 if frame is None else level

"""Warnings attributed to the user's line.

A fixed ``stacklevel`` points at the right frame for one call path only: the same warning
reached through ``LoRAMBoOptimizer.step`` (schedule, growth, ``set_rank``) or through a torch
optimizer step post-hook sits several frames deeper than through ``set_rank`` called directly,
and would be reported at a line inside lorambo. That line is what ``warnings.filterwarnings(...,
module=...)`` matches and what the default filter shows once per location, so it must be the
user's. :func:`warn_user` reports the warning at the innermost frame outside lorambo, its
kernels, the libraries that call back into lorambo (torch's hooks and optimizer wrappers,
transformers' Trainer and accelerate running ``LoRAMBoCallback``), ``contextlib`` (the
``with`` blocks lorambo provides) and ``runpy`` (which runs ``python -m lorambo``), like Python
3.12's ``skip_file_prefixes``. When every frame is one of those (the ``lorambo`` command), it is
reported at lorambo's own calling line.

A warning can be an exception (``filterwarnings("error")``, ``pytest -W error``). Raised in the
middle of a rank change it would stop it half-way: the pools edited, the optimizer's state not,
or some layers of a decision grown and the rest not. Functions that edit state wrap themselves
in :func:`warns_when_done`: their warnings (and those of what they call) are held until the
outermost such call has finished, then given in order.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")

__all__ = ["warn_user", "warns_when_done"]


_CALLING_BACK = ("lorambo_kernels", "torch", "transformers", "accelerate")


def _folder(path) -> str:
    return str(Path(path).resolve().parent) + os.sep


def _internal_prefixes() -> tuple[str, ...]:
    """lorambo's folder, contextlib, runpy (its frames are named ``<frozen runpy>`` where the
    interpreter runs the frozen copy, as ``python -m`` does by default), and the folders of those
    of ``_CALLING_BACK`` imported by now (read from ``sys.modules``: one not imported has no
    frame on the stack, and looking it up would run the import system's finders)."""
    prefixes = [_folder(__file__), contextlib.__file__, "<frozen runpy>"]
    runpy = sys.modules.get("runpy")
    if getattr(runpy, "__file__", None):
        prefixes.append(runpy.__file__)
    for package in _CALLING_BACK:
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


_held = threading.local()  # .warnings: the list a warns_when_done call holds, or None


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` reported at the innermost caller outside lorambo (at
    lorambo's own calling line when every frame is internal, as under ``python -m lorambo``);
    inside a :func:`warns_when_done` call, once that call has finished."""
    held = getattr(_held, "warnings", None)
    if held is not None:
        held.append((message, category))
        return
    prefixes = _internal_prefixes()
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn_user's caller
    while frame is not None and _is_internal(frame.f_code.co_filename, prefixes):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=2 if frame is None else level)


def warns_when_done(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a function that edits state: the warnings given while it runs come after it
    returns, or before the exception it raises propagates (a warning raised as an error then
    gives way to that exception). Nested calls hold theirs for the outermost one."""
    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if getattr(_held, "warnings", None) is not None:  # an outer call gives them
            return function(*args, **kwargs)
        _held.warnings = held = []
        try:
            result = function(*args, **kwargs)
        except BaseException:
            _held.warnings = None
            for message, category in held:
                try:
                    warn_user(message, category)
                except Exception:  # filtered into an error: the function's own exception comes first
                    pass
            raise
        _held.warnings = None
        for message, category in held:
            warn_user(message, category)
        return result

    return wrapper

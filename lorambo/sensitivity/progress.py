"""The ``progress`` argument of the long passes: checked, and whether a bar is drawn."""

from __future__ import annotations

import sys

from lorambo.distributed import is_main_process

__all__ = ["check_progress", "show_bar"]


def check_progress(progress, who: str) -> bool | None:
    """``progress`` as given: True, False or None (TypeError naming ``who`` and the value
    otherwise: a string such as "no" is truthy and would draw the bar)."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"{who}: progress must be True, False or None, got {progress!r}")
    return progress


def show_bar(progress, who: str) -> bool:
    """A bar on stderr for ``progress=True``, none for False; None: only when stderr is a
    terminal (not a log file). Under torch.distributed only the main process draws one.
    ``progress`` is checked by :func:`check_progress`."""
    progress = check_progress(progress, who)
    if progress is None:
        progress = sys.stderr.isatty()
    return progress and is_main_process()

"""Whether a long pass draws its progress bar."""

from __future__ import annotations

import sys

from lorambo.distributed import is_main_process

__all__ = ["show_bar"]


def show_bar(progress: bool | None) -> bool:
    """A bar on stderr for ``progress=True``, none for False; None: only when stderr is a
    terminal (not a log file). Under torch.distributed only the main process draws one."""
    if progress is None:
        progress = sys.stderr.isatty()
    return bool(progress) and is_main_process()

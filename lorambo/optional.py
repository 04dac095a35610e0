"""The error for a missing optional package (peft, transformers): an ImportError naming the
function that needs it and the ``pip install`` command, as the README's error table promises."""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["requires"]


@contextmanager
def requires(package: str, caller: str):
    """``with requires("peft", "from_peft"): from peft import ...``. A ModuleNotFoundError for
    ``package`` itself becomes an ImportError naming ``caller`` and the pip command; any other
    (a module missing inside an installed package, or one of its dependencies) propagates as is."""
    try:
        yield
    except ModuleNotFoundError as error:
        if error.name != package:
            raise
        raise ImportError(f"{caller} needs {package}, which is not installed: pip install {package}") from error

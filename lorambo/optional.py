"""The error for a missing or too old optional package (peft, transformers): an ImportError
naming the function that needs it and the ``pip install`` command, as the error table of
docs/guarantees.md promises."""

from __future__ import annotations

import importlib.metadata
import re
from contextlib import contextmanager

__all__ = ["MINIMUM_VERSIONS", "requires"]

# The oldest release of each optional package lorambo runs with, as pyproject.toml's extras state
# them (tests/test_optional_versions.py compares the two). transformers before 5.0 takes no
# ``dtype=`` in from_pretrained (lorambo's loaders pass it), fails Trainer resumes under torch's
# weights_only default (4.45) and leaves reentrant checkpointing without input gradients (4.57).
# peft 0.13 is the oldest release the adapters' import and export ran with.
MINIMUM_VERSIONS = {"transformers": (5, 0), "peft": (0, 13)}


def _release(text: str) -> tuple[int, ...]:
    """(5, 0, 1) for "5.0.1", "5.0.1rc1" or "5.0.1+local": the leading numeric fields."""
    match = re.match(r"\d+(\.\d+)*", text)
    return tuple(map(int, match.group().split("."))) if match else ()


def check_version(package: str, caller: str) -> None:
    """ImportError naming ``caller``, the version found and the one needed when the installed
    ``package`` is older than :data:`MINIMUM_VERSIONS` says; nothing when it is not installed."""
    minimum = MINIMUM_VERSIONS.get(package)
    if minimum is None:
        return
    try:
        found = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return  # the import says so, naming the caller
    if _release(found) < minimum:
        need = ".".join(map(str, minimum))
        raise ImportError(f"{caller} needs {package} >= {need}, found {package} {found}: "
                          f"pip install '{package}>={need}'")


@contextmanager
def requires(package: str, caller: str):
    """``with requires("peft", "from_peft"): from peft import ...``. A ModuleNotFoundError for
    ``package`` itself becomes an ImportError naming ``caller`` and the pip command; any other
    (a module missing inside an installed package, or one of its dependencies) propagates as is.
    An installed ``package`` older than :data:`MINIMUM_VERSIONS` allows is refused the same way,
    before the import runs (an old release may fail inside it)."""
    check_version(package, caller)
    try:
        yield
    except ModuleNotFoundError as error:
        if error.name != package:
            raise
        raise ImportError(f"{caller} needs {package}, which is not installed: pip install {package}") from error

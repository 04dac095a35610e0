"""An experiment's artefacts (``results.json``, ``results.txt``, the summaries and the PNGs) as one set.

Each file alone is written atomically, but a finish stopped between two of them (Ctrl-C while
the plots are drawn, a full disk) would leave a folder whose files come from two finishes, one
of them half done. So the artefacts are drawn and written into a hidden folder inside the output
folder first (:func:`staging`), and only then moved into place together (:func:`publish`,
``atomic_write_many``: on any error every file keeps its old content), ``results.json`` last:
it marks a finished experiment, and a folder without it is not one.

A new journal in a folder that already holds a ``results.json`` (another experiment's, its
journal removed) is refused (:func:`check_no_foreign_results`): during the run that file would
look like this run's result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorambo.adapters.atomic import atomic_write_many

__all__ = ["RESULTS", "check_no_foreign_results", "publish", "staging"]

RESULTS = "results.json"  # written last: the mark of a finished experiment
_STAGE_PREFIX = ".artefacts-"


@contextlib.contextmanager
def staging(out_dir) -> Iterator[Path]:
    """A new hidden folder inside ``out_dir`` to write the artefacts into (the same filesystem,
    so :func:`publish` renames them); removed on exit, whatever happened."""
    stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=out_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out_dir, names: Iterable[str], caller: str) -> None:
    """Move the files ``names`` (paths relative to ``stage``) to the same places in ``out_dir``,
    all or none, ``results.json`` last."""
    out_dir = Path(out_dir)
    ordered = sorted(dict.fromkeys(names), key=lambda name: name == RESULTS)  # stable: the rest keep their order
    atomic_write_many({out_dir / name: _mover(stage / name) for name in ordered}, caller)


def _mover(source: Path):
    def write(tmp: str) -> None:
        os.replace(source, tmp)

    return write


def check_no_foreign_results(out_dir, journal_name: str) -> None:
    """ValueError if ``out_dir`` holds a ``results.json`` but no journal: the artefacts of
    another experiment, which a new run there would seem to have written until it finishes."""
    out_dir = Path(out_dir)
    if (out_dir / RESULTS).exists() and not (out_dir / journal_name).exists():
        raise ValueError(f"{out_dir} holds the results of another experiment ({out_dir / RESULTS}) but no journal "
                         f"({journal_name}): until this run finished they would look like its results. Choose "
                         "another --out, or move them away")

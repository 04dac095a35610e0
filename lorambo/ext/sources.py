"""The identity of the C++/CUDA sources an extension build compiles: a SHA-256 of csrc/.

setup.py compiles it into ``lorambo._C`` (``lorambo._C.sources_hash``) and records it next to
the built module (``_C.sources``, shipped in a wheel); lorambo.ext.loader compares the two, or
the module's with the hash of the csrc/ it runs next to (a checkout, an editable install), and
refuses a build of other sources as stale. Standard library only: setup.py loads this file by
path, before lorambo (and torch) are importable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# every file the compiler reads (csrc/README.md is not one)
SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
RECORD = "_C.sources"  # the hash of a build, written next to lorambo/_C*.so


def sources_hash(csrc: str | Path) -> str:
    """SHA-256 (hex) over the relative path and content of every source file under ``csrc``,
    in path order; the same for a CPU-only and a CUDA build of one checkout."""
    root = Path(csrc)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES):
        name = path.relative_to(root).as_posix().encode()
        content = path.read_bytes()
        digest.update(b"%d:%s%d:" % (len(name), name, len(content)))
        digest.update(content)
    return digest.hexdigest()

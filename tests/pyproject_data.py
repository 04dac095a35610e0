"""pyproject.toml as data, for tests that check the code against what the project declares.

Python 3.10 (the declared floor) has no ``tomllib``; its backport ``tomli`` has the same API and is
in requirements/dev.txt for that interpreter only."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())

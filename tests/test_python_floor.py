"""Nothing in the code needs a Python newer than pyproject.toml's ``requires-python``.

Only one interpreter (3.11) runs the suite here and in CI, so the declared floor (3.10) is
checked statically: vermin reads every file and names each stdlib module, member or syntax that
needs a newer Python (``tomllib``, ``typing.Self``, ``except*``...)."""

import re
import subprocess
import sys

from pyproject_data import ROOT, pyproject

CHECKED = ["lorambo", "kernels", "tests", "tools", "benchmarks", "setup.py"]


def _declared_floor() -> str:
    declared = pyproject()["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(3\.\d+)", declared)
    assert match, f"requires-python {declared!r} is not a plain lower bound"
    return match[1]


def _vermin(floor: str, *paths: str) -> subprocess.CompletedProcess:
    # `.long()` on tensors reads to vermin as Python 2's `long` builtin.
    return subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", f"--target={floor}-", "--violations", "--eval-annotations",
         "--no-tips", "--exclude", "long", "--processes", "1", *paths],
        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_file_needs_a_python_newer_than_the_declared_floor():
    proc = _vermin(_declared_floor(), *CHECKED)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_check_names_a_newer_python_feature(tmp_path):
    """The check above would pass if vermin looked at nothing."""
    (tmp_path / "newer.py").write_text("import tomllib\nfrom typing import Self\n")
    proc = _vermin(_declared_floor(), str(tmp_path))
    assert proc.returncode != 0
    assert "'tomllib' module requires" in proc.stdout and "'typing.Self' member requires" in proc.stdout

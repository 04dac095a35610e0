"""Install layout: kernels/ is never importable as ``kernels``; a built wheel works outside the tree."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_folder_is_not_a_top_level_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = ("import importlib.util, transformers.utils.import_utils as iu; "
            "import lorambo_kernels; print(iu.is_kernels_available(), lorambo_kernels.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.split()[:2] == ["False", "lorambo_kernels"]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_imports_outside_the_tree(tmp_path, fresh_venv):
    env = {**os.environ, "LORAMBO_SKIP_EXT": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps",
                    "-q", "-w", str(tmp_path / "dist")], check=True, env=env, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("lorambo-*.whl"))
    assert "lorambo/py.typed" in zipfile.ZipFile(wheel).namelist()  # PEP 561: type checkers read the annotations
    venv, py = fresh_venv  # lorambo comes from the wheel
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    code = ("import lorambo, lorambo_kernels, torch; "
            "m = lorambo.configure_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2); "
            "print(lorambo.__file__); print(lorambo_kernels.__file__); print(m(torch.randn(2, 4)).shape); "
            "import importlib.metadata as md; print(lorambo.__version__ == md.version('lorambo'))")
    proc = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert all(line.startswith(str(venv)) for line in lines[:2]), lines
    assert lines[2] == "torch.Size([2, 4])"
    assert lines[3] == "True"  # lorambo.__version__ is the version the package was built with
    cli = subprocess.run([str(venv / "bin" / "lorambo"), "info"], capture_output=True, text=True, check=True)
    assert "lorambo 0.1.0" in cli.stdout


@pytest.mark.parametrize("value", ["true", "yes", "2"])
def test_a_skip_ext_switch_other_than_0_or_1_stops_the_build_naming_it(value):
    """``LORAMBO_SKIP_EXT=true`` used to build the extension: only "1" skipped it."""
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "LORAMBO_SKIP_EXT": value}, timeout=300)
    assert proc.returncode != 0 and f"LORAMBO_SKIP_EXT must be 0 or 1, got {value!r}" in proc.stderr

"""setup.py finds the CUDA toolkit that nvcc belongs to, also behind a wrapper script on PATH
(where torch's guess of CUDA_HOME, the folder above nvcc, holds no libcudart and the link fails)."""

import ast
import os
import shutil
import stat
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


def _setup_functions() -> dict:
    """setup.py's imports and functions, without its module-level build and setup() call."""
    tree = ast.parse(SETUP.read_text())
    body = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    namespace: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace


def _script(folder: Path, body: str) -> Path:
    path = folder / "nvcc"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_wrapper_script_resolves_to_the_toolkit_with_libcudart(tmp_path, monkeypatch):
    real = shutil.which("nvcc")
    if real is None:
        pytest.skip("no nvcc on this machine")
    _script(tmp_path, f'exec "{os.path.realpath(real)}" "$@"')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    setup = _setup_functions()
    root = Path(setup["toolkit_root"]())
    assert root != tmp_path.parent and (root / "bin" / "nvcc").exists()
    assert any((root / lib / "libcudart.so").exists() for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))
    setup["_point_torch_at_the_toolkit"]()
    assert os.environ["CUDA_HOME"] == str(root)


def test_an_explicit_cuda_home_is_kept(tmp_path, monkeypatch):
    _script(tmp_path, 'echo "#$ TOP=/somewhere/else/bin/.."')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_HOME", "/opt/my-cuda")
    _setup_functions()["_point_torch_at_the_toolkit"]()
    assert os.environ["CUDA_HOME"] == "/opt/my-cuda"


def test_an_nvcc_that_names_no_toolkit_leaves_torch_its_guess(tmp_path, monkeypatch):
    _script(tmp_path, "echo 'nvcc: no dry run here' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    setup = _setup_functions()
    assert setup["toolkit_root"]() is None
    setup["_point_torch_at_the_toolkit"]()
    assert "CUDA_HOME" not in os.environ


def test_the_reported_toolkit_is_resolved_through_links(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-99.0"
    (toolkit / "bin").mkdir(parents=True)
    (tmp_path / "cuda").symlink_to(toolkit)
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    _script(wrapper, f'echo "#\\$ TOP={tmp_path}/cuda/bin/.."')
    monkeypatch.setenv("PATH", f"{wrapper}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    setup = _setup_functions()
    assert setup["toolkit_root"]() == str(toolkit)
    setup["_point_torch_at_the_toolkit"]()
    assert os.environ["CUDA_HOME"] == str(toolkit)

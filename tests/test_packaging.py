"""Install layout: kernels/ is never importable as ``kernels``; a built wheel works outside the tree."""

import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pyproject_data import pyproject

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_folder_is_not_a_top_level_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = ("import importlib.util, transformers.utils.import_utils as iu; "
            "import lorambo_kernels; print(iu.is_kernels_available(), lorambo_kernels.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.split()[:2] == ["False", "lorambo_kernels"]


def test_the_kernels_package_carries_the_version_of_the_distribution_that_ships_it():
    import lorambo
    import lorambo_kernels

    assert lorambo_kernels.__version__ == lorambo.__version__


def test_the_declared_setuptools_floor_reads_the_license_as_written():
    """``project.license`` as an SPDX string (PEP 639) is read from setuptools 77 on; an older one
    refuses the whole pyproject.toml ("`project.license` must be valid exactly by one definition")."""
    from packaging.requirements import Requirement

    data = pyproject()
    assert isinstance(data["project"]["license"], str)
    floors = [Requirement(r) for r in data["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    assert len(floors) == 1
    assert floors[0].specifier.contains("77.0.0")
    assert not any(floors[0].specifier.contains(v) for v in ("64.0.0", "69.5.1", "76.1.0"))


def test_the_license_text_is_the_one_the_metadata_declares():
    """pyproject.toml declared Apache-2.0 while the tree held no license text, so the wheel and
    sdist carried none."""
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert pyproject()["project"]["license"] == "Apache-2.0"
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "http://www.apache.org/licenses/LICENSE-2.0" in text


def _python_classifier_versions(classifiers) -> list[str]:
    return [c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]


def test_the_python_classifiers_are_the_versions_requires_python_admits_from_its_floor():
    """The index's "Python 3.x" badges and filters read the classifiers; each listed version must
    install (requires-python), and the list starts at the floor and leaves no version out."""
    project = pyproject()["project"]
    spec = SpecifierSet(project["requires-python"])
    floors = [Version(s.version) for s in spec if s.operator == ">="]
    assert len(floors) == 1
    versions = [Version(v) for v in _python_classifier_versions(project["classifiers"])]
    assert versions and all(v in spec for v in versions), versions
    assert versions == [Version(f"3.{minor}") for minor in range(floors[0].minor, floors[0].minor + len(versions))]
    assert "Programming Language :: Python :: 3 :: Only" in project["classifiers"]
    assert ("Typing :: Typed" in project["classifiers"]) == (ROOT / "lorambo" / "py.typed").is_file()


def test_the_built_metadata_carries_the_classifiers_beside_the_spdx_license(tmp_path):
    """PEP 517's metadata hook, as pip runs it: a "License ::" classifier beside the SPDX license
    is refused by setuptools >= 77, so the license is the License-Expression alone."""
    code = "import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "LORAMBO_SKIP_EXT": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dist_info = proc.stdout.strip().splitlines()[-1]
    metadata = email.parser.Parser().parsestr((tmp_path / dist_info / "METADATA").read_text(encoding="utf-8"))
    assert metadata.get_all("Classifier") == pyproject()["project"]["classifiers"]
    assert metadata["License-Expression"] == "Apache-2.0"
    assert not [c for c in metadata.get_all("Classifier") if c.startswith("License ::")]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_imports_outside_the_tree(tmp_path, fresh_venv):
    env = {**os.environ, "LORAMBO_SKIP_EXT": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps",
                    "-q", "-w", str(tmp_path / "dist")], check=True, env=env, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("lorambo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorambo/py.typed" in names  # PEP 561: type checkers read the annotations
    # the license the metadata declares travels with the code (PEP 639: dist-info/licenses/)
    license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    assert zipfile.ZipFile(wheel).read(license_file) == (ROOT / "LICENSE").read_bytes()
    venv, py = fresh_venv  # lorambo comes from the wheel
    subprocess.run([str(py), "-I", "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    code = ("import lorambo, lorambo_kernels, torch; "
            "m = lorambo.configure_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2); "
            "print(lorambo.__file__); print(lorambo_kernels.__file__); print(m(torch.randn(2, 4)).shape); "
            "import importlib.metadata as md; print(lorambo.__version__ == md.version('lorambo'))")
    proc = subprocess.run([str(py), "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert all(line.startswith(str(venv)) for line in lines[:2]), lines
    assert lines[2] == "torch.Size([2, 4])"
    assert lines[3] == "True"  # lorambo.__version__ is the version the package was built with
    cli = subprocess.run([str(venv / "bin" / "lorambo"), "info"], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert "lorambo 0.1.0" in cli.stdout


@pytest.mark.parametrize("value", ["true", "yes", "2"])
def test_a_skip_ext_switch_other_than_0_or_1_stops_the_build_naming_it(value):
    """``LORAMBO_SKIP_EXT=true`` used to build the extension: only "1" skipped it."""
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "LORAMBO_SKIP_EXT": value}, timeout=300)
    assert proc.returncode != 0 and f"LORAMBO_SKIP_EXT must be 0 or 1, got {value!r}" in proc.stderr


def test_a_wheel_holds_nothing_an_earlier_build_left_in_build_lib(tmp_path):
    """build/lib of an earlier build with the extension (and a module since deleted) went into the
    next wheel: LORAMBO_SKIP_EXT=1 made a py3-none-any wheel holding a stale lorambo/_C*.so."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_C.sources", "tests")
    shutil.copytree(ROOT / "lorambo", src / "lorambo", ignore=ignore)
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=ignore)
    stale = src / "build" / "lib" / "lorambo"
    stale.mkdir(parents=True)
    for name in ("_C.cpython-311-x86_64-linux-gnu.so", "_C.sources", "removed_module.py"):
        (stale / name).write_text("left by an earlier build\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(tmp_path / "dist")], check=True, cwd=src, timeout=300,
                   env={**os.environ, "LORAMBO_SKIP_EXT": "1"})
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("lorambo-*.whl"))).namelist()
    expected = {str(p.relative_to(src / "lorambo")) for p in (src / "lorambo").rglob("*.py")}
    assert {n.split("/", 1)[1] for n in names if n.startswith("lorambo/") and n.endswith(".py")} == expected
    assert not [n for n in names if "_C" in n or "removed_module" in n]


def _scratch_tree(tmp_path):
    """The files a build reads, without built extensions or tests."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_C.sources", "tests")
    for folder in ("lorambo", "kernels", "csrc"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    return src


def test_a_failed_compile_gives_a_pure_python_wheel(tmp_path):
    """With no working compiler the wheel was tagged cp311-cp311-linux_x86_64 although it held no
    extension: pure Python bound to one interpreter and platform."""
    src = _scratch_tree(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation", "--no-deps",
                           "-v", "-w", str(tmp_path / "dist")], cwd=src, timeout=600, capture_output=True,
                          text=True, env={**os.environ, "CXX": "/bin/false", "CC": "/bin/false",
                                          "LORAMBO_BUILD_CUDA": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled extension skipped, build failed" in proc.stdout + proc.stderr
    wheel = next((tmp_path / "dist").glob("lorambo-*.whl"))
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorambo/__init__.py" in names and not [n for n in names if "_C" in n]
    wheel_meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
    assert "Root-Is-Purelib: true" in zipfile.ZipFile(wheel).read(wheel_meta).decode()


def test_skip_ext_with_build_cuda_1_is_refused_naming_both():
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "LORAMBO_SKIP_EXT": "1", "LORAMBO_BUILD_CUDA": "1"}, timeout=300)
    assert proc.returncode != 0
    assert "LORAMBO_SKIP_EXT=1 (no compiled extension) contradicts LORAMBO_BUILD_CUDA=1" in proc.stderr

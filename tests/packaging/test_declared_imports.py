"""Every third-party package the installed code imports is declared in pyproject.toml: a module
imported when ``import lorambo`` runs in ``dependencies``, any other in ``dependencies`` or an
extra. An undeclared one works in the development venv and fails only in a user's clean one."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pyproject_data import pyproject

ROOT = Path(__file__).resolve().parents[2]
OWN = {"lorambo", "lorambo_kernels"}


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - OWN - set(sys.stdlib_module_names)


def _distributions(import_names: set[str]) -> dict[str, set[str]]:
    """import name -> the canonical names of the distributions that install it."""
    installed = importlib.metadata.packages_distributions()
    return {name: {canonicalize_name(d) for d in installed.get(name, [])} for name in import_names}


def _declared(requirements) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_every_imported_package_is_a_dependency_or_in_an_extra():
    project = pyproject()["project"]
    declared = _declared(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared |= _declared(extra)
    sources = [*ROOT.glob("lorambo/**/*.py"), *ROOT.glob("kernels/lorambo_kernels/**/*.py")]
    imported = set().union(*(_imports(ast.parse(path.read_text())) for path in sources))
    assert {"torch", "numpy", "transformers", "triton"} <= imported  # the scan sees the code
    undeclared = {name: dists for name, dists in _distributions(imported).items() if not dists & declared}
    assert not undeclared, undeclared


def test_what_importing_lorambo_loads_is_a_core_dependency():
    code = "import sys, lorambo, lorambo.cli; print(' '.join(m for m in sys.modules if '.' not in m))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = set(proc.stdout.split())
    # lorambo's own imports only (lorambo_kernels, which imports triton, is not imported here)
    own_imports = set().union(*(_imports(ast.parse(p.read_text())) for p in ROOT.glob("lorambo/**/*.py")))
    assert {"torch", "numpy", "safetensors"} <= own_imports & loaded  # the check sees what lorambo loads
    core = _declared(pyproject()["project"]["dependencies"])
    missing = {name: dists for name, dists in _distributions(own_imports & loaded).items() if not dists & core}
    assert not missing, missing

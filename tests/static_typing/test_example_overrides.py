"""The example's TrainerCallback subclasses override Trainer's hooks with Trainer's parameter
names: a renamed one (``a`` for ``args``) is an incompatible override to mypy and pyright, an
error in a file users copy. Parsed, not run (tests/examples runs it)."""

import ast
import inspect
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def overrides(path: Path):
    """(class, method, parameter names) of every on_* method of a TrainerCallback subclass."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("TrainerCallback") for b in node.bases):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("on_"):
                    yield node.name, item.name, [a.arg for a in item.args.posonlyargs + item.args.args]


def test_callback_overrides_keep_trainers_parameter_names():
    found = [(path.name, *entry) for path in sorted(EXAMPLES.glob("*.py")) for entry in overrides(path)]
    assert found
    for file, cls, method, names in found:
        base = getattr(transformers.TrainerCallback, method)
        expected = [p.name for p in inspect.signature(base).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert names == expected, f"{file}: {cls}.{method}"

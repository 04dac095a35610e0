"""Every ``lorambo.a.b`` a Python block of the README or of a docs/*.md page uses is there after the
imports those blocks make, in a fresh interpreter: a submodule that ``import lorambo`` does not import (and
that no block imports) is an AttributeError for a user who copies the block, and a mypy error."""

import ast
import subprocess
import sys

from test_readme_blocks import PAGES, page_blocks


def dotted_names(tree: ast.AST) -> set[str]:
    """``lorambo.x.y`` attribute chains read in ``tree`` (the longest of each chain)."""
    found, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                inner.add(id(value))
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "lorambo" and id(node) not in inner:
                found.add(".".join(["lorambo", *reversed(parts)]))
    return found


def test_every_dotted_lorambo_name_in_a_block_exists_after_the_blocks_imports():
    trees = [ast.parse(code) for page in PAGES for code in page_blocks(page)]
    imports = [ast.unparse(node) for tree in trees for node in ast.walk(tree)
               if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "lorambo" for a in node.names)
               or isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lorambo"]
    names = sorted(set().union(*(dotted_names(tree) for tree in trees)))
    assert "import lorambo" in imports and "lorambo.optim.AdamW" in names
    check = "\n".join(imports + [
        "import functools, operator",
        f"for name in {names!r}:",
        "    try:",
        "        functools.reduce(getattr, name.split('.')[1:], lorambo)",
        "    except AttributeError as e:",
        "        print(name, '->', e)",
    ])
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""

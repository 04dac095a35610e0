"""lorambo.ext.sources.sources_hash: what a build compiled, so that any edit of a file the compiler
reads makes the built module stale, and nothing else does."""

import random
import shutil

import pytest

from lorambo.ext.sources import sources_hash

# what setup.py's compiler reads from csrc/: C++ and CUDA sources and headers
COMPILED = (".cpp", ".cu", ".h", ".cuh")


def _tree(root, rng):
    """A csrc/-like tree: one source of each compiled suffix (one in a subfolder) and a README."""
    files = {f"ops{suffix}" if i % 2 else f"sub/ops{suffix}": f"// {rng.random()}\n"
             for i, suffix in enumerate(COMPILED)}
    files["README.md"] = "not compiled\n"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return files


@pytest.mark.parametrize("suffix", COMPILED)
def test_an_edit_of_any_compiled_source_changes_the_hash(tmp_path, suffix):
    files = _tree(tmp_path, random.Random(suffix))
    before = sources_hash(tmp_path)
    (name,) = [n for n in files if n.endswith(suffix)]
    with open(tmp_path / name, "a") as source:
        source.write("// edited\n")
    assert sources_hash(tmp_path) != before


def test_files_the_compiler_does_not_read_leave_the_hash_alone(tmp_path):
    _tree(tmp_path, random.Random(1))
    before = sources_hash(tmp_path)
    (tmp_path / "README.md").write_text("edited\n")
    (tmp_path / "notes.txt").write_text("new\n")
    (tmp_path / "sub" / "ops.cpp.orig").write_text("a backup\n")
    assert sources_hash(tmp_path) == before


def test_the_hash_follows_paths_relative_to_csrc(tmp_path):
    """The same sources elsewhere hash alike; a file moved to another folder does not."""
    _tree(tmp_path / "a", random.Random(2))
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "csrc")
    assert sources_hash(tmp_path / "elsewhere" / "csrc") == sources_hash(tmp_path / "a")
    (tmp_path / "a" / "sub" / "ops.h").rename(tmp_path / "a" / "ops.h")
    assert sources_hash(tmp_path / "a") != sources_hash(tmp_path / "elsewhere" / "csrc")

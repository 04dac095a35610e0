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


def test_an_edit_that_keeps_the_length_changes_the_hash(tmp_path):
    files = _tree(tmp_path, random.Random(3))
    before = sources_hash(tmp_path)
    text = files["ops.cu"]
    (tmp_path / "ops.cu").write_text(text[:-2] + ("x" if text[-2] != "x" else "y") + "\n")
    assert sources_hash(tmp_path) != before


def test_a_renamed_file_or_text_moved_between_files_changes_the_hash(tmp_path):
    """Names count (an #include names the file), and where one file ends: the same bytes split
    differently over two files are other sources."""
    _tree(tmp_path, random.Random(4))
    before = sources_hash(tmp_path)
    (tmp_path / "sub" / "ops.h").rename(tmp_path / "sub" / "ops2.h")  # the same place in path order
    assert sources_hash(tmp_path) != before
    (tmp_path / "sub" / "ops2.h").rename(tmp_path / "sub" / "ops.h")
    assert sources_hash(tmp_path) == before
    first, second = tmp_path / "ops.cu", tmp_path / "ops.cuh"  # adjacent in path order
    joined = first.read_text() + second.read_text()
    first.write_text(joined[:3])
    second.write_text(joined[3:])
    assert sources_hash(tmp_path) != before


def test_a_folder_named_like_a_source_is_not_read(tmp_path):
    _tree(tmp_path, random.Random(5))
    before = sources_hash(tmp_path)
    (tmp_path / "third_party.cu").mkdir()
    assert sources_hash(tmp_path) == before

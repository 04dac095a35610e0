"""The docs and the source name what exists. Every repository path (``lorambo/nn/slots.py``,
``tests/kernels/test_aot_sm90.py``) that README.md, csrc/README.md, docs/*.md or a source file's
docstrings and comments name is in the tree; every ``lorambo.*`` / ``lorambo_kernels.*`` name and
``--option`` that csrc/README.md and docs/*.md name resolves, and every ``LORAMBO_*`` variable they
name is read somewhere (test_readme_api.py and test_readme_cli.py check the README's). Parsing
and imports only: fast."""

import re
from pathlib import Path

import pytest

from test_readme_api import resolve
from test_readme_cli import subcommands

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "csrc" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OTHER_DOCS = DOCS[1:]
SOURCE_FOLDERS = ("lorambo", "kernels", "benchmarks", "tools", "csrc")


def named_paths(text: str, tops: set[str]) -> set[str]:
    """Paths in ``text`` that start at a top-level folder of the repository (or at
    ``lorambo_kernels/``, the installed name of kernels/lorambo_kernels/, and ``lorambo/*.h``, the
    headers under csrc/include/) and name a file."""
    path = re.compile(r"(?<![\w./-])((?:%s)/(?:[\w.-]+/)*[\w-]+\.[a-z]+)\b" % "|".join(map(re.escape, sorted(tops))))
    return set(path.findall(text))


def test_every_named_repository_path_exists():
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != ".git"} | {"lorambo_kernels"}
    sources = DOCS + sorted(p for folder in SOURCE_FOLDERS for suffix in (".py", ".sh", ".cpp", ".cu", ".h")
                            for p in (ROOT / folder).rglob(f"*{suffix}") if "build" not in p.parts)
    checked, missing = 0, []
    for doc in sources:
        for path in named_paths(doc.read_text(encoding="utf-8"), tops):
            here = doc.parent.relative_to(ROOT)
            checked += 1
            if not any((ROOT / c).is_file() for c in (path, f"kernels/{path}", f"csrc/include/{path}", here / path)):
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert checked > 100 and not missing, missing


@pytest.mark.parametrize("doc", OTHER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_lorambo_name_resolves(doc):
    text = doc.read_text(encoding="utf-8")
    names = set(re.findall(r"(?<![\w.])(lorambo(?:_kernels)?(?:\.[A-Za-z_]\w*)+)", text))
    broken = []
    for name in sorted(n for n in names if not n.endswith((".py", ".md", ".pt"))):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            broken.append(f"{name}: {error}")
    assert not broken, broken


@pytest.mark.parametrize("doc", OTHER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_option_exists(doc):
    spans = re.findall(r"`([^`\n]+)`", doc.read_text(encoding="utf-8"))
    named = {m for span in spans for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span)}
    known = {s for parser in subcommands().values() for a in parser._actions for s in a.option_strings}
    scripts = "".join(p.read_text(encoding="utf-8") for folder in ("tools", "benchmarks")
                      for pattern in ("*.py", "*.sh") for p in (ROOT / folder).rglob(pattern))
    known |= set(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", scripts))
    known |= {"--no-build-isolation", "--timeout", "--junitxml"}  # pip's, pytest-timeout's, pytest's
    assert not sorted(named - known)


def test_every_environment_variable_is_read():
    """Read by lorambo, its kernels, the build, the scripts or the test suite (``LORAMBO_REQUIRE_EXT``
    turns the extension tests' skip into an error); the docs tests themselves do not count."""
    named = {v for doc in OTHER_DOCS for v in re.findall(r"\bLORAMBO_[A-Z_]+\b", doc.read_text(encoding="utf-8"))}
    assert "LORAMBO_BUILD_CUDA" in named
    readers = [ROOT / "setup.py", ROOT / ".ci" / "run"] + [
        p for folder in ("lorambo", "kernels", "benchmarks", "tools", "tests") for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".sh") and "docs" not in p.relative_to(ROOT).parts]
    source = "".join(p.read_text(encoding="utf-8") for p in readers if p.is_file())
    assert not sorted(v for v in named if not re.search(rf"\b{v}\b", source))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, the text of links and code kept, other
    punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_every_link_between_the_docs_lands():
    """Every relative Markdown link of README.md, csrc/README.md and docs/*.md names a file that
    exists and, with ``#anchor``, a heading of it: the README's API overview and the pages send
    readers to each other's sections."""
    checked, broken = 0, []
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            where = (doc.parent / path).resolve() if path else doc
            checked += 1
            if not where.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in anchors(where):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 30 and not broken, broken

"""The command lines of the README and the docs/*.md pages use options that exist: every
``lorambo COMMAND ...`` they show parses with the real parser, and every other ``--option`` they
name is an option of a lorambo command or of a script in the repository (tools/, benchmarks/).
Parsing only: fast."""

import argparse
import re
import shlex
from pathlib import Path

from lorambo.cli import build_parser
from test_readme_blocks import REFERENCE

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = {p: (ROOT / p).read_text(encoding="utf-8")
         for p in ("README.md", *sorted(str(d.relative_to(ROOT)) for d in (ROOT / "docs").glob("*.md")))}
COMMAND = re.compile(r"^lorambo (demo|experiment|allocate|info)\b")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def command_lines(text: str) -> list[str]:
    spans = re.findall(r"`([^`\n]+)`", text)
    lines = [line.strip() for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
             for line in block.splitlines()]
    return [c for c in spans + lines if COMMAND.match(c)]


def test_every_lorambo_command_line_uses_real_options():
    commands = subcommands()
    lines = {page: command_lines(text) for page, text in PAGES.items()}
    assert any(line.startswith("lorambo allocate --model PATH --budget") for line in lines["docs/interop.md"])
    assert any(line.startswith("lorambo allocate --model") for line in lines["README.md"])
    unknown = []
    for line in [line for page_lines in lines.values() for line in page_lines]:
        words = shlex.split(line.split("#")[0])
        options = {s for a in commands[words[1]]._actions for s in a.option_strings}
        unknown += [f"{line}: {w}" for w in words[2:] if w.startswith("--") and w.split("=")[0] not in options]
    assert not unknown, unknown


def test_every_named_option_exists_somewhere():
    # the README and the reference pages its API overview links to (test_doc_references.py checks
    # the other docs/ pages, which also name the shell scripts' and pytest's options)
    named = {m for page in REFERENCE for span in re.findall(r"`([^`\n]+)`", PAGES[page])
             for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span)}
    known = {s for parser in subcommands().values() for a in parser._actions for s in a.option_strings}
    scripts = "".join(p.read_text(encoding="utf-8") for folder in ("tools", "benchmarks")
                      for p in (ROOT / folder).rglob("*.py"))
    known |= set(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", scripts))
    known |= {"--no-build-isolation"}  # pip's
    assert not sorted(named - known)

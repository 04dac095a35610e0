"""The README's command lines use options that exist: every ``lorambo COMMAND ...`` it shows
parses with the real parser, and every other ``--option`` it names is an option of a lorambo
command or of a script in the repository (tools/, benchmarks/). Parsing only: fast."""

import argparse
import re
import shlex
from pathlib import Path

from lorambo.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMAND = re.compile(r"^lorambo (demo|experiment|allocate|info)\b")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def command_lines() -> list[str]:
    spans = re.findall(r"`([^`\n]+)`", README)
    lines = [line.strip() for block in re.findall(r"^```[a-z]*\n(.*?)^```", README, flags=re.S | re.M)
             for line in block.splitlines()]
    return [c for c in spans + lines if COMMAND.match(c)]


def test_every_lorambo_command_line_uses_real_options():
    commands = subcommands()
    lines = command_lines()
    assert any(line.startswith("lorambo allocate --model") for line in lines)
    unknown = []
    for line in lines:
        words = shlex.split(line.split("#")[0])
        options = {s for a in commands[words[1]]._actions for s in a.option_strings}
        unknown += [f"{line}: {w}" for w in words[2:] if w.startswith("--") and w.split("=")[0] not in options]
    assert not unknown, unknown


def test_every_named_option_exists_somewhere():
    named = {m for span in re.findall(r"`([^`\n]+)`", README) for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span)}
    known = {s for parser in subcommands().values() for a in parser._actions for s in a.option_strings}
    scripts = "".join(p.read_text(encoding="utf-8") for folder in ("tools", "benchmarks")
                      for p in (ROOT / folder).rglob("*.py"))
    known |= set(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", scripts))
    known |= {"--no-build-isolation"}  # pip's
    assert not sorted(named - known)

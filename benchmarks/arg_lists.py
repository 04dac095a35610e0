"""Comma-separated option values checked against their choices (imported from benchmarks/ as a
plain module): a misspelt name is an argparse error naming the option and the value, not a run
that measures nothing or labels one thing as another."""

from __future__ import annotations

import argparse


def names_from(allowed) -> callable:
    """An argparse ``type``: ``"a,b"`` -> ``["a", "b"]``, every name one of ``allowed``, at least one."""
    allowed = tuple(allowed)

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'no name given'} "
                f"(choose from {','.join(allowed)})")
        return names

    return parse

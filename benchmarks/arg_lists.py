"""Option values checked as argparse parses them (imported from benchmarks/ as a plain module):
a misspelt name or a count of 0 is an error naming the option and the value, not a run that
measures nothing, labels one thing as another or quietly takes the default. Nothing from lorambo
is imported here: bench_lora_linear sets TRITON_INTERPRET before lorambo is first imported."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def names_from(allowed) -> Callable[[str], list[str]]:
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


def positive(convert=int) -> Callable[[str], int | float]:
    """An argparse ``type``: ``convert(text)`` (int or float), finite and > 0."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {convert.__name__}, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {convert.__name__}, got {text!r}")
        return value

    return parse

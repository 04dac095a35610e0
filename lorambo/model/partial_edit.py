"""Saying what a multi-layer edit left changed when it stops part-way.

An edit that goes layer by layer (merging every adapter, copying a file into every layer) can
be stopped after some layers by what no check beforehand rules out: out of memory in one
layer's temporaries, Ctrl-C. Undoing the finished layers would need a copy of each (the memory
a merge without ``exact`` saves) or is itself inexact, so the error says instead which layers
were done and that repeating the call finishes the edit.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["add_note", "note_partial_edit"]


def add_note(err: BaseException, text: str) -> None:
    """``err.add_note(text)`` where Python has it (3.11+: shown under the message)."""
    if hasattr(err, "add_note"):
        err.add_note(text)


def note_partial_edit(err: BaseException, call: str, stopped_at: str, done: Sequence[str], state: str,
                      rest: str) -> None:
    """Add a note to ``err`` (Python >= 3.11 shows it under the message): ``call`` stopped at
    layer ``stopped_at``; the ``done`` layers are ``state``, the others ``rest``."""
    if not done:
        return
    shown = list(done)[:6] + (["..."] if len(done) > 6 else [])
    add_note(err, f"{call} stopped at {stopped_at!r}, after {len(done)} of the layers: {shown} {state}, the others "
                 f"{rest}. Calling {call} again finishes it.")

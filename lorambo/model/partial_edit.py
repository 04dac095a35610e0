"""Saying what a multi-layer edit left changed when it stops part-way.

An edit that goes layer by layer (merging every adapter, copying a file into every layer) can
be stopped after some layers by what no check beforehand rules out: out of memory in one
layer's temporaries, Ctrl-C. Undoing the finished layers would need a copy of each (the memory
a merge without ``exact`` saves) or is itself inexact, so the error says instead which layers
were done and that repeating the call finishes the edit.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["note_partial_edit"]


def note_partial_edit(err: BaseException, call: str, stopped_at: str, done: Sequence[str], state: str,
                      rest: str) -> None:
    """Add a note to ``err`` (Python >= 3.11 shows it under the message): ``call`` stopped at
    layer ``stopped_at``; the ``done`` layers are ``state``, the others ``rest``."""
    if not done or not hasattr(err, "add_note"):
        return
    shown = list(done)[:6] + (["..."] if len(done) > 6 else [])
    err.add_note(f"{call} stopped at {stopped_at!r}, after {len(done)} of the layers: {shown} {state}, the others "
                 f"{rest}. Calling {call} again finishes it.")

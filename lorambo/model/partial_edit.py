"""Saying what a multi-layer edit left changed when it stops part-way.

An edit that goes layer by layer (merging every adapter, copying a file into every layer) can
be stopped after some layers by what no check beforehand rules out: out of memory in one
layer's temporaries, Ctrl-C. Undoing the finished layers would need a copy of each (the memory
a merge without ``exact`` saves) or is itself inexact, so the error says instead which layers
were done and that repeating the call finishes the edit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["add_note", "note_partial_edit", "note_rank_changes_kept", "shown_layers"]

SHOWN = 6  # layers a note lists before "..."


_NATIVE_NOTES = sys.version_info >= (3, 11)  # BaseException.add_note (PEP 678)


def add_note(err: BaseException, text: str) -> None:
    """``err.add_note(text)``: the note joins ``err.__notes__`` and shows under the message.

    Python 3.10 has neither ``add_note`` nor a traceback that prints ``__notes__``: there the note
    joins ``__notes__`` all the same, and an error whose message is its one string argument shows
    the note as the message's next line, so that what was left changed is not lost."""
    if _NATIVE_NOTES:
        err.add_note(text)
        return
    err.__notes__ = [*getattr(err, "__notes__", []), text]
    if len(err.args) == 1 and isinstance(err.args[0], str):
        err.args = (f"{err.args[0]}\n{text}",)


def shown_layers(names: Sequence[str]) -> list[str]:
    """The first :data:`SHOWN` of ``names``, and ``"..."`` after them when there are more."""
    names = list(names)
    return names[:SHOWN] + (["..."] if len(names) > SHOWN else [])


def note_partial_edit(err: BaseException, call: str, stopped_at: str, done: Sequence[str], state: str,
                      rest: str) -> None:
    """Add a note to ``err`` (Python >= 3.11 shows it under the message): ``call`` stopped at
    layer ``stopped_at``; the ``done`` layers are ``state``, the others ``rest``."""
    if not done:
        return
    shown = shown_layers(done)
    add_note(err, f"{call} stopped at {stopped_at!r}, after {len(done)} of the layers: {shown} {state}, the others "
                 f"{rest}. Calling {call} again finishes it.")


def note_rank_changes_kept(err: BaseException, call: str, records: Sequence[dict], recorded: str, unit: str) -> None:
    """Add a note to ``err``: ``call`` stopped after the rank changes ``records`` (decision records:
    ``layer``, ``old_rank``, ``new_rank``), which stay (``recorded``: where they are on record); the
    rest of the ``unit`` (a round, a decision) was not taken."""
    if not records:
        return
    changes = [(r["layer"], r["old_rank"], r["new_rank"]) for r in records]
    add_note(err, f"{call} stopped after {len(records)} rank change(s) {changes}, which stay{recorded}; the rest "
                  f"of the {unit} was not taken")

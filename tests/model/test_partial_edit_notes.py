"""The layer lists in the notes of an edit stopped part-way: the first six names, and "..." only
when some are left out."""

import traceback

import pytest

from lorambo.model.partial_edit import shown_layers


@pytest.mark.parametrize("count", [0, 1, 5, 6, 7, 12])
def test_shown_layers_lists_six_and_dots_only_when_more_are_left_out(count):
    names = [f"layer{i}" for i in range(count)]
    expected = names if count <= 6 else names[:6] + ["..."]
    assert shown_layers(names) == expected
    assert shown_layers(tuple(names)) == expected


@pytest.mark.parametrize("native", [True, False], ids=["python>=3.11", "python3.10"])
def test_a_note_joins_notes_and_shows_with_the_message_on_every_python(monkeypatch, native):
    """Python 3.10 has no add_note and prints no __notes__: there the note must still be read,
    in __notes__ and as the message's next line."""
    from lorambo.model import partial_edit

    if native and not partial_edit._NATIVE_NOTES:
        pytest.skip("BaseException.add_note needs Python 3.11")
    monkeypatch.setattr(partial_edit, "_NATIVE_NOTES", native)
    err = RuntimeError("load_adapter: the file is not for this label set")
    partial_edit.add_note(err, "first note")
    partial_edit.add_note(err, "second note")
    assert err.__notes__ == ["first note", "second note"]
    shown = "".join(traceback.format_exception(err))
    assert "the file is not for this label set" in shown
    assert shown.index("first note") < shown.index("second note")
    interrupt = KeyboardInterrupt()  # no message to carry the note: __notes__ alone
    partial_edit.add_note(interrupt, "stopped part-way")
    assert interrupt.__notes__ == ["stopped part-way"]

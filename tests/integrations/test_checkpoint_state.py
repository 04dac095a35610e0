"""lorambo_state.pt: a damaged file is refused naming it."""

import pytest
import torch

from lorambo.integrations import checkpoint

STATE = {"version": 1, "decisions": [{"step": 3, "layer": "a", "event": "grow"}], "ranks": {"a": 2},
         "importance": None, "alora_rounds_done": None}


def test_round_trip(tmp_path):
    checkpoint.save_callback_state(tmp_path, STATE)
    assert checkpoint.load_callback_state(tmp_path) == STATE


@pytest.mark.parametrize("keep", [0, 10, 0.5, -4])
def test_truncated_file_is_named(tmp_path, keep):
    """torch.load's own error (RuntimeError from the zip reader) named no file."""
    file = checkpoint.save_callback_state(tmp_path, STATE)
    raw = file.read_bytes()
    file.write_bytes(raw[:int(len(raw) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match=rf"{file.name} is not a readable lorambo trainer state"):
        checkpoint.load_callback_state(tmp_path)


def test_missing_entries_are_named(tmp_path):
    """A version-1 dict without decisions or ranks loaded and failed later with a KeyError in restore."""
    torch.save({"version": 1, "ranks": {"a": 2}}, tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(ValueError, match=r"lorambo trainer state without \['decisions'\]"):
        checkpoint.load_callback_state(tmp_path)

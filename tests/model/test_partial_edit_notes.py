"""The layer lists in the notes of an edit stopped part-way: the first six names, and "..." only
when some are left out."""

import pytest

from lorambo.model.partial_edit import shown_layers


@pytest.mark.parametrize("count", [0, 1, 5, 6, 7, 12])
def test_shown_layers_lists_six_and_dots_only_when_more_are_left_out(count):
    names = [f"layer{i}" for i in range(count)]
    expected = names if count <= 6 else names[:6] + ["..."]
    assert shown_layers(names) == expected
    assert shown_layers(tuple(names)) == expected

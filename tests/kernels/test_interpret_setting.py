"""``TRITON_INTERPRET`` is read as triton reads it: a value triton takes (``true``) is not refused."""

import pytest

from lorambo_kernels import config


@pytest.mark.parametrize("value, interpreted", [("1", True), ("true", True), ("ON", True), ("yes", True),
                                                ("0", False), ("false", False), ("2", False)])
def test_triton_and_lorambo_agree_on_the_variable(monkeypatch, value, interpreted):
    # before: only "1" counted, so with TRITON_INTERPRET=true triton interpreted its kernels while
    # lorambo refused CPU tensors with "... (or CPU tensors under TRITON_INTERPRET=1)"
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert bool(knobs.runtime.interpret) is interpreted  # triton's own reading
    assert config.is_interpreter() is interpreted
    reason = config.unavailable_reason("cpu")
    if interpreted:
        assert reason == config.interpreter_incompatibility()
    else:
        assert "need a CUDA device" in reason

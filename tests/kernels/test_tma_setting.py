"""``LORAMBO_TMA=0|1|auto``: any other value is refused, naming the variable and the value."""

import pytest
import torch

from lorambo_kernels import config


@pytest.mark.parametrize("value", ["yes", "2", ""])
def test_unknown_value_is_refused(monkeypatch, value):
    # before: anything but 0/off/false and 1/on/true silently meant auto
    monkeypatch.setenv("LORAMBO_TMA", value)
    with pytest.raises(ValueError, match=f"LORAMBO_TMA={value!r}"):
        config.want_tma(torch.device("cpu"))


@pytest.mark.parametrize("value", ["0", "off", "False", " auto "])
def test_known_values_choose_the_pointer_path_on_cpu(monkeypatch, value):
    monkeypatch.setenv("LORAMBO_TMA", value)
    assert config.want_tma(torch.device("cpu")) is False

"""A stale extension (an older build left in place) is refused as broken, naming what it lacks."""

import re
import warnings
from pathlib import Path

import pytest
import torch
from ext_testutil import needs_ext

from lorambo.ext import loader as ext_loader

ROOT = Path(__file__).resolve().parents[2]


def test_loader_checks_every_operator_the_sources_define():
    source = (ROOT / "csrc" / "ops.cpp").read_text()
    defined = set(re.findall(r'm\.def\("([A-Za-z_0-9]+)\(', source))
    assert defined and defined == set(ext_loader.OPERATORS)


@pytest.fixture
def fresh_loader(monkeypatch):
    saved = dict(ext_loader._state)
    ext_loader._state.clear()
    yield
    ext_loader._state.clear()
    ext_loader._state.update(saved)


@needs_ext
def test_extension_lacking_an_operator_is_refused_with_one_warning(monkeypatch, fresh_loader):
    monkeypatch.setattr(ext_loader, "OPERATORS", (*ext_loader.OPERATORS, "op_from_a_newer_source"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ext_loader.load() is None and ext_loader.load() is None and not ext_loader.available()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "stale" in messages[0] and "op_from_a_newer_source" in messages[0] and "rebuild" in messages[0]
    with pytest.raises(RuntimeError, match="op_from_a_newer_source"):
        ext_loader.require()


@needs_ext
def test_complete_extension_loads_without_warning(fresh_loader):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = ext_loader.load()
    assert module is not None and all(hasattr(torch.ops.lorambo, name) for name in ext_loader.OPERATORS)

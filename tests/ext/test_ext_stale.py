"""A stale extension (an older build left in place) is refused as broken, naming what it lacks or
the sources it was built from."""

import re
import shutil
import types
import warnings
from pathlib import Path

import pytest
import torch
from ext_testutil import needs_ext

from lorambo.ext import loader as ext_loader
from lorambo.ext import ops as ext_ops
from lorambo.ext.sources import RECORD, sources_hash

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
        assert not ext_ops.available()  # the multi-tensor ops' own check says the same
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
    assert ext_loader.available() and ext_ops.available()


def _load_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ext_loader.load() is None and ext_loader.load() is None and not ext_loader.available()
    return [str(w.message) for w in caught]


@needs_ext
def test_extension_built_before_the_sources_changed_is_refused_with_one_warning(tmp_path, monkeypatch,
                                                                              fresh_loader):
    """Every operator name is there, but csrc/ changed since the build (a `git pull` without a
    rebuild): the module is refused, once, and lorambo runs on Triton/PyTorch."""
    import lorambo._C

    assert lorambo._C.sources_hash == sources_hash(ROOT / "csrc")  # this checkout's build is current
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    with open(tmp_path / "csrc" / "inplace.cpp", "a") as source:
        source.write("// an edit since the build\n")
    monkeypatch.setattr(ext_loader, "CSRC", tmp_path / "csrc")
    messages = _load_warnings()
    assert len(messages) == 1, messages
    assert "stale" in messages[0] and "rebuild" in messages[0] and "Triton/PyTorch" in messages[0]
    assert lorambo._C.sources_hash in messages[0] and sources_hash(tmp_path / "csrc") in messages[0]
    # the rebuild the Makefile runs: pip's default isolated build has no torch, builds no
    # extension and leaves the stale file in place
    assert f"rebuild it in {tmp_path} with `pip install --no-build-isolation -e .`" in messages[0], messages
    with pytest.raises(RuntimeError, match="stale"):
        ext_loader.require()


@needs_ext
def test_extension_built_before_the_sources_were_hashed_is_refused(monkeypatch, fresh_loader):
    """A module older than the hash (no ``sources_hash``) has the operator names of today's
    csrc/ but not, e.g., the in-place ops' version bumps (csrc/inplace.cpp)."""
    import lorambo._C

    monkeypatch.delattr(lorambo._C, "sources_hash")
    messages = _load_warnings()
    assert len(messages) == 1 and "stale" in messages[0] and "hash None" in messages[0], messages


@needs_ext
def test_installed_wheel_compares_the_module_with_the_hash_its_build_recorded(tmp_path, monkeypatch,
                                                                            fresh_loader):
    """A wheel has no csrc/: the module is compared with the record its build left next to it."""
    import lorambo._C

    monkeypatch.setattr(ext_loader, "CSRC", tmp_path / "no-csrc")
    monkeypatch.setattr(lorambo._C, "__file__", str(tmp_path / Path(lorambo._C.__file__).name))
    (tmp_path / RECORD).write_text(lorambo._C.sources_hash + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext_loader.load() is lorambo._C
    ext_loader._state.clear()
    (tmp_path / RECORD).write_text("0" * 64 + "\n")  # a module copied over another build's
    messages = _load_warnings()
    assert len(messages) == 1 and "stale" in messages[0] and str(tmp_path / RECORD) in messages[0], messages
    # no checkout to rebuild in: reinstall from source as the README installs, not `pip install -e .`
    assert "reinstall lorambo from its source with `pip install --no-build-isolation .`" in messages[0], messages
    assert "-e ." not in messages[0] and "build_ext --inplace" not in messages[0], messages


@needs_ext
def test_another_packages_csrc_beside_an_installed_lorambo_is_not_taken_for_its_sources(tmp_path, monkeypatch,
                                                                                     fresh_loader):
    """site-packages/csrc/ops.cpp of some other package: the wheel's record decides, no warning."""
    import lorambo._C

    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "ops.cpp").write_text("// not lorambo's\n")
    monkeypatch.setattr(ext_loader, "CSRC", tmp_path / "csrc")
    monkeypatch.setattr(lorambo._C, "__file__", str(tmp_path / Path(lorambo._C.__file__).name))
    (tmp_path / RECORD).write_text(lorambo._C.sources_hash + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext_loader.load() is lorambo._C


@needs_ext
def test_a_module_with_neither_csrc_nor_a_record_is_checked_by_its_operators_only(tmp_path, monkeypatch,
                                                                                fresh_loader):
    """No csrc/ beside the package and no _C.sources next to the module (e.g. a build copied in by
    hand): nothing to compare the hash with, so a module with every operator loads, quietly."""
    import lorambo._C

    monkeypatch.setattr(ext_loader, "CSRC", tmp_path / "no-csrc")
    monkeypatch.setattr(lorambo._C, "__file__", str(tmp_path / Path(lorambo._C.__file__).name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext_loader.load() is lorambo._C
    assert ext_loader.require() is lorambo._C


def test_in_a_checkout_the_module_is_compared_with_the_csrc_beside_the_package():
    """Not with the hash the last build recorded: after a `git pull` without a rebuild the two differ."""
    module = types.SimpleNamespace(__file__=str(ROOT / "lorambo" / "_C.so"))
    assert ext_loader._expected_sources(module) == (sources_hash(ROOT / "csrc"), str(ROOT / "csrc"))


@pytest.mark.parametrize("missing, warns", [("lorambo._C", False), ("libtorch_extra", True)])
def test_a_missing_extension_is_quiet_and_a_missing_dependency_of_it_warns(monkeypatch, fresh_loader, missing,
                                                                          warns):
    """Not built (LORAMBO_SKIP_EXT=1): no warning. Built, but something it imports is missing: broken,
    one warning. Either way require() says why, naming the import error."""
    def import_module(name):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(ext_loader, "importlib", types.SimpleNamespace(import_module=import_module))
    messages = _load_warnings()
    assert messages == ([f"lorambo._C failed to import (No module named {missing!r}); using Triton/PyTorch"]
                        if warns else [])
    with pytest.raises(RuntimeError, match=re.escape(f"lorambo._C is not available (No module named {missing!r})")):
        ext_loader.require()

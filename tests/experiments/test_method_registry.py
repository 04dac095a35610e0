"""The method registry: every configurable method has exactly one class, under its own name."""

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments.methods import Method, RunContext
from lorambo.experiments.registry import METHOD_CLASSES, make_method


def test_every_configured_method_has_a_class_named_after_it():
    assert set(METHOD_CLASSES) == set(presets.METHODS)
    for name, cls in METHOD_CLASSES.items():
        assert issubclass(cls, Method) and cls.name == name
    closed = {n: METHOD_CLASSES[n] for n in ("gradient", "hessian", "data", "frobenius")}
    assert {n: c.sensitivity for n, c in closed.items()} == {n: n for n in closed}


def test_make_method_builds_a_fresh_instance_or_names_the_valid_ones():
    ctx = RunContext(task=None, cfg=None, level=1.0, budget=100, seed=0, calib=[], heldout=[])
    first, second = make_method("online", ctx), make_method("online", ctx)
    assert first is not second and first.ctx is ctx and type(first) is METHOD_CLASSES["online"]
    with pytest.raises(ValueError, match="unknown method 'lora'; valid methods: uniform, oracle"):
        make_method("lora", ctx)

"""Experiment methods by name: the one module that knows every method module.

The method modules import only their shared base (``methods.py``); this module imports them all,
so imports point one way.
"""

from __future__ import annotations

from lorambo.experiments import methods_lorambo, methods_peft
from lorambo.experiments.methods import Method, RunContext

__all__ = ["METHOD_CLASSES", "make_method"]

METHOD_CLASSES: dict[str, type[Method]] = {cls.name: cls for cls in (
    methods_lorambo.Uniform, methods_lorambo.Oracle, methods_lorambo.Online, methods_lorambo.Moves,
    methods_lorambo.MovesAblation, methods_lorambo.ALoRA,
    methods_lorambo.Probe, methods_lorambo.ProbeSqrt,
    *(methods_lorambo.closed_form_method(s) for s in ("gradient", "hessian", "data", "frobenius")),
    methods_peft.AdaLoRA, methods_peft.EVA)}


def make_method(name: str, ctx: RunContext) -> Method:
    """A fresh instance of method ``name`` for one run."""
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHOD_CLASSES)}")
    return METHOD_CLASSES[name](ctx)

"""help() has something to say about every public name: each one in the documented namespaces'
``__all__`` has a docstring, and so has every public method and property of their classes (an
override without its own docstring shows the one it overrides, as help() does)."""

import inspect

import pytest

import lorambo
import lorambo.integrations.fsdp
import lorambo.nn
import lorambo.optim
import lorambo.sensitivity
from lorambo.allocation.alora import ALoRAConfig
from lorambo.integrations import LoRAMBoCallback

NAMESPACES = (lorambo, lorambo.sensitivity, lorambo.optim, lorambo.nn, lorambo.integrations.fsdp)
PUBLIC = {f"{ns.__name__}.{name}": getattr(ns, name) for ns in NAMESPACES for name in ns.__all__}
PUBLIC.update({"lorambo.integrations.LoRAMBoCallback": LoRAMBoCallback,
               "lorambo.allocation.alora.ALoRAConfig": ALoRAConfig})


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_has_a_docstring(name):
    assert (inspect.getdoc(PUBLIC[name]) or "").strip()


@pytest.mark.parametrize("name", sorted(n for n, obj in PUBLIC.items() if inspect.isclass(obj)))
def test_every_public_method_and_property_has_a_docstring(name):
    cls = PUBLIC[name]
    undocumented = [attr for attr, value in vars(cls).items() if not attr.startswith("_")
                    and (inspect.isfunction(value) or isinstance(value, property))
                    and not (inspect.getdoc(getattr(cls, attr)) or "").strip()]
    assert not undocumented

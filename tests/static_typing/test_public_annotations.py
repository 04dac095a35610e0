"""No annotation of the public API leaves a generic bare (``dict``, ``list[dict]``,
``os.PathLike``): pyright in strict mode reports every call that touches one as "partially
unknown" in the user's own code, which mypy does not show (test_user_code_types.py)."""

import inspect
import re

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
# a generic name not followed by its parameters (annotations are strings: from __future__ import annotations)
BARE = re.compile(r"(?<!\w)(dict|list|tuple|set|Mapping|Sequence|Iterable|Iterator|Callable|PathLike)\b(?!\[)")


def public_functions():
    """(dotted name, function) of every public function, and of every public method and
    property getter of the public classes (constructors included)."""
    for name, obj in PUBLIC.items():
        if not inspect.isclass(obj):
            yield name, obj
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_") and attr != "__init__":
                continue
            value = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if inspect.isfunction(value):
                yield f"{name}.{attr}", value


def test_no_public_annotation_leaves_a_generic_bare():
    found = list(public_functions())
    assert len(found) > 100
    bare = {f"{name}({parameter})": text for name, function in found
            for parameter, text in inspect.unwrap(function).__annotations__.items()
            if isinstance(text, str) and BARE.search(text)}
    assert not bare

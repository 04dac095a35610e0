"""The optional compiled extension ``lorambo._C`` (built from csrc/), seen from Python.

- :mod:`lorambo.ext.loader`: imports the extension once; absent is quiet, broken warns once.
- :mod:`lorambo.ext.fake`: fake (meta) implementations of its ops for torch.compile.
- :mod:`lorambo.ext.flops`: FLOP formulas of the LoRA linear ops (all backends) for FlopCounterMode.
- :mod:`lorambo.ext.ops`: Python entry points of the multi-tensor ops (reductions, pool remap).

A bottom-floor package (docs/architecture.md): it imports nothing from lorambo outside itself.
The LoRA linear op built on the extension is :mod:`lorambo.ops.ext_linear`.
"""

from lorambo.ext.loader import available, load, require

__all__ = ["available", "load", "require"]

"""The model an adapter file describes, under the wrappers that only add a name prefix.

Adapter files name each layer by its dotted name in the model. ``torch.compile`` (its
``OptimizedModule``) and DDP wrap a model and prefix every name (``_orig_mod.``, ``module.``),
so a file written from the wrapper would name nothing in the plain model it is loaded into.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without its torch.compile / DistributedDataParallel wrappers (any nesting)."""
    while True:
        # no OptimizedModule exists unless torch._dynamo was imported: no need to import it here
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
            continue
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            model = model.module
            continue
        return model

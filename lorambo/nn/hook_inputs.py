"""The input of a layer call, as a forward hook registered ``with_kwargs=True`` sees it.

Linear-family forwards take one tensor, passed by position (``layer(x)``) or by keyword
(``layer(x=...)``, nn.Linear's ``layer(input=...)``); a hook reading only ``args[0]`` fails
with an IndexError on the second form.
"""

from __future__ import annotations

import torch

__all__ = ["layer_input"]


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The one input tensor of ``layer(*args, **kwargs)``."""
    return args[0] if args else next(iter(kwargs.values()))

"""The mode analysis passes run the model in: eval, with every module's own flag restored after.

Train mode would make a pass change the model and its numbers: BatchNorm updates its running
statistics on every forward, and dropout draws a fresh mask per pass (gradients become noisy and
the Hessian changes between Hutchinson's probes). docs/sensitivities.md (*Mode*) states the rule.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Put every submodule of ``model`` in eval mode; restore each one's ``training`` flag on
    exit, also when the block raises."""
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in was_training:
            m.training = flag

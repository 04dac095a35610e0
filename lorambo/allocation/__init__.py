"""Per-layer rank allocation under a global parameter budget (pure numbers: numpy + stdlib).

``allocate(dims, sensitivities, budget, method=...)`` returns ``{name: rank}`` with
``sum_i rank_i * (d_i + k_i) <= budget``. Modules: ``validate`` (input checks), ``uniform``,
``closed_form`` (square-root law), ``exchange`` (its integer local search), ``greedy`` (one heap
engine for all gain-based methods), ``exact`` (DP optimum, test oracle), ``api`` (dispatcher).

Around it, on torch: ``capacity`` (pool sizes for the ranks), ``online`` and ``schedule``
(rank growth during training and when it happens), ``alora`` (ALoRA rounds), ``report``.
"""
from .api import GAIN_METHODS, METHODS, allocate

__all__ = ["allocate", "METHODS", "GAIN_METHODS"]

"""Layer sensitivities for rank allocation: Hessian traces and operator norms from exact
Hessian-vector products (Hutchinson, Hutch++, XTrace, power iteration), gradient norms, input
covariances and best rank-r approximation errors.

Convention for every model-level estimator: ``loss_fn(model, batch) -> scalar tensor``,
``batches`` a non-empty iterable of batches, ``modules`` None (every LoRA layer, else every
Linear / Conv1D except the output head) or a list of module names.
"""

from .ablation import ComponentAblation, ablation_scores
from .adalora_importance import AdaLoRAImportance
from .estimate import Estimate
from .fisher import FisherProxy, per_example_sq_grad_norms
from .opnorm import hessian_opnorm
from .simple import data_covariance, gradient_sensitivity, targets_without_gradient
from .sketch import hutchinson, hutchpp, xtrace
from .spectral import data_weighted_tail_energy, frobenius_tail_energy
from .targets import Target, differentiable, find_targets
from .trace import hessian_trace

__all__ = [
    "Estimate", "hessian_trace", "hessian_opnorm", "gradient_sensitivity", "data_covariance",
    "data_weighted_tail_energy", "frobenius_tail_energy", "hutchinson", "hutchpp", "xtrace",
    "find_targets", "differentiable", "Target", "FisherProxy", "per_example_sq_grad_norms",
    "ComponentAblation", "ablation_scores", "AdaLoRAImportance", "targets_without_gradient",
]

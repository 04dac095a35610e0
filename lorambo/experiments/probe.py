"""The probe sensitivity: a short all-layer LoRA, then how much loss each layer's update carries.

The closed-form sensitivities (Hessian trace, data covariance, Frobenius norm) are measured on the
pretrained model and do not depend on the fine-tuning target at all; the gradient does, but at
the pretrained point every layer can partly absorb the target's error, so it ranks by module type
more than by where the change lives. The probe instead lets every layer compete for the target:

1. a rank-``r`` LoRA on every adapted layer, trained for ``probe_steps`` steps on the seed's own
   training stream (AdamW, ``probe_lr``);
2. per layer ``i``, its update alone is switched off (``B_i = 0``, every other layer keeps its
   own) and the loss is read on ``rows`` training rows: the removal score
   ``s_i = L(without ΔW_i) - L(all)`` (clipped at 0) is the loss that layer's update carries;
3. two rules turn that into ranks:

   - ``probe`` (knapsack): the removal score is split over the singular directions of the layer's
     update ``ΔW_i = B_i A_i`` in proportion to their energy, ``g_ij = s_i σ_ij² / Σ_j σ_ij²``
     (for a loss quadratic in ΔW with isotropic curvature, the loss a direction carries), and
     the greedy knapsack (:func:`lorambo.allocate`, ``method="knapsack"``) buys directions by
     gain per parameter ``g_ij / (d_i + k_i)``. A layer whose update needs two directions shows
     two large singular values, so it gets two ranks, not a share of the square root;
   - ``probe_sqrt``: the square-root law on the removal scores, ``r_i ∝ sqrt(s_i / (d_i + k_i))``,
     like the other closed-form sensitivities.

On the planted task (rank 8, 60 steps at 3e-3) the four planted layers score highest of the 36;
the knapsack rule covers 0.83 of the planted ranks on each of three seeds, the square-root law
0.67 (docs/demo_sensitivity_candidates.md). No layer gets more ranks than the probe's rank: the
gains past it are unknown.

Cost: ``probe_steps`` training steps plus 37 forward passes on ``rows`` rows and one small SVD per
layer; it reads the training split only.
"""

from __future__ import annotations

import time

import torch

from lorambo.model import configure_model, lora_layers
from lorambo.experiments.student import PREFIX


def _rows(task, rows: int) -> dict:
    train = task.splits["train"]
    n = min(rows, next(iter(train.values())).shape[0])
    return {k: v[:n] for k, v in train.items()}


def probe_sensitivity(task, cfg, seed: int, batches: list, rows: int = 32) -> dict:
    """``{"removal": {Student name: s_i >= 0}, "gains": {Student name: [g_i1 >= g_i2 >= ...]},
    "probe_loss": float, "seconds": float}`` (see the module doc)."""
    if len(batches) < cfg.probe_steps:
        raise ValueError(f"probe: needs {cfg.probe_steps} training batches, got {len(batches)} "
                         f"(probe_steps must not exceed steps)")
    started = time.perf_counter()
    rank = cfg.probe_rank
    student = task.fresh_student(seed)
    student.eval()  # no dropout, as in every run
    configure_model(student, {PREFIX + n: rank for n in task.dims}, alpha=None)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.probe_lr, weight_decay=0.0)
    for batch in batches[:cfg.probe_steps]:
        loss = task.loss(student, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"probe: training loss {float(loss)} at lr {cfg.probe_lr}; lower probe_lr")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    batch = _rows(task, rows)
    layers = lora_layers(student)
    removal = {}
    with torch.no_grad():
        full = float(task.loss(student, batch))
        for name in task.names:
            lora_b = layers[name].lora_B
            saved = lora_b.detach().clone()
            lora_b.zero_()
            try:
                removal[name] = max(float(task.loss(student, batch)) - full, 0.0)
            finally:
                lora_b.copy_(saved)
    gains = {name: direction_gains(removal[name], layers[name]) for name in task.names}
    return {"removal": removal, "gains": gains, "probe_loss": full, "seconds": time.perf_counter() - started}


@torch.no_grad()
def direction_gains(removal: float, layer) -> list[float]:
    """``[s σ_1² / Σσ², s σ_2² / Σσ², ...]`` over the singular values of the layer's active update
    ``B A`` (non-increasing, as the knapsack needs); all zeros when the update is zero."""
    rank = layer.rank
    update = layer.lora_B[:, :rank].double() @ layer.lora_A[:rank].double()
    energy = torch.linalg.svdvals(update).pow(2)
    total = float(energy.sum())
    if not total > 0:
        return [0.0] * rank
    return [removal * float(e) / total for e in energy[:rank]]


"""Planted structure: the target is the pretrained MiniLM plus known low-rank weight deltas.

A few chosen layers get ``ΔW_i = c_i U_i V_iᵀ`` (U_i, V_i random with orthonormal columns, rank
``r_i``, all singular values equal to c_i, so the true rank is unambiguous); every other layer is
unchanged. ``c_i`` is calibrated so that each delta *alone* moves the final hidden states by the
same relative RMS (``scale``): no planted layer is invisible. A LoRA student that learns exactly
these deltas reproduces the target; the ranks an allocator gives the planted layers, against the
planted ranks, show whether it found them (ALoRA's sanity check).
"""

from __future__ import annotations

import copy

import torch

# Four layers of different types, depths and costs; ranks 8, 4, 4, 2. Their LoRA cost is
# 8*768 + 4*1920 + 4*768 + 2*1920 = 20,736 parameters, half of budget level 1 (41,472).
PLANTED_RANKS = {
    "layer.1.attention.self.value": 8,
    "layer.2.intermediate.dense": 4,
    "layer.3.attention.output.dense": 4,
    "layer.4.output.dense": 2,
}
PLANTED_SEED = 1234  # the planted structure is part of the task: fixed, whatever the run seed


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q  # (rows, cols), orthonormal columns


def make_directions(dims: dict[str, tuple[int, int]], planted: dict[str, int], seed: int = PLANTED_SEED
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{short name: (U [d, r], V [k, r])}`` in float64."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, r in planted.items():
        if name not in dims:
            raise ValueError(f"planted layer {name!r} is not an adapted layer; layers: {list(dims)[:6]} ...")
        d, k = dims[name]
        if not 1 <= r <= min(d, k):
            raise ValueError(f"planted rank {r} of {name!r} outside [1, {min(d, k)}]")
        out[name] = (orthonormal(d, r, gen), orthonormal(k, r, gen))
    return out


def _linear(bert, name: str) -> torch.nn.Linear:
    return bert.encoder.get_submodule(name)


@torch.no_grad()
def _hidden(bert, batch) -> torch.Tensor:
    return bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


@torch.no_grad()
def calibrate(bert, directions, batch, scale: float) -> dict[str, float]:
    """``{name: c_i}`` such that ΔW_i alone gives ``RMS(h' - h) = scale * RMS(h)`` on ``batch``
    (one forward per layer at c = 1; the change is close to linear in c at these sizes)."""
    bert.eval()
    base = _hidden(bert, batch)
    ref = base.pow(2).mean().sqrt()
    out = {}
    for name, (u, v) in directions.items():
        layer = _linear(bert, name)
        saved = layer.weight.detach().clone()
        layer.weight += (u @ v.T).to(layer.weight.dtype)
        change = (_hidden(bert, batch) - base).pow(2).mean().sqrt()
        layer.weight.copy_(saved)
        if not change > 0:
            raise RuntimeError(f"planted delta in {name!r} does not change the output")
        out[name] = float(scale * ref / change)
    return out


def deltas(directions, coefs) -> dict[str, torch.Tensor]:
    """``{name: ΔW [d, k]}`` in float64."""
    return {n: coefs[n] * u @ v.T for n, (u, v) in directions.items()}


@torch.no_grad()
def make_teacher(bert, delta: dict[str, torch.Tensor]):
    """A copy of ``bert`` with the deltas added to the planted layers' weights."""
    teacher = copy.deepcopy(bert).eval()
    for name, dw in delta.items():
        layer = _linear(teacher, name)
        layer.weight += dw.to(layer.weight.dtype)
    return teacher


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation with average ranks for ties; 0.0 when either side is constant
    (e.g. uniform ranks: no ordering at all, so no agreement with the planted one)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2.0
            i = j + 1
        return out

    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return 0.0
    return sxy / (sxx * syy) ** 0.5


def recovery(ranks: dict[str, int], dims: dict[str, tuple[int, int]], planted: dict[str, int]) -> dict:
    """Rank correlation with the planted ranks (all layers, 0 where nothing is planted), the
    share of the spent budget on planted layers, and the share of planted ranks covered."""
    names = list(dims)
    got = [float(ranks.get(n, 0)) for n in names]
    want = [float(planted.get(n, 0)) for n in names]
    spent = sum(ranks.get(n, 0) * sum(dims[n]) for n in names)
    on_planted = sum(ranks.get(n, 0) * sum(dims[n]) for n in planted)
    covered = sum(min(ranks.get(n, 0), r) for n, r in planted.items())
    return {"spearman": spearman(got, want), "planted_share": on_planted / spent if spent else 0.0,
            "planted_coverage": covered / sum(planted.values())}

"""unmerge() after merge(exact=False) and a cast of the layer: docs/model.md's bound with the two
dtypes' unit roundoffs and the pools' rounding by the cast. The bound without a cast,
2u·max(|w|, |w+Δ|), does not hold with the new dtype's u after a narrowing cast: the cast rounds
the pools too, so the delta subtracted is not the delta added, and where B_r A_r cancels, that
difference is as large as u·|s|·(|B_r||A_r|)."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear

U = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _layer(dtype, cancelling):
    gen = torch.Generator().manual_seed(4)
    layer = LoRAMBoLinear(nn.Linear(16, 12, dtype=dtype), rank=2, capacity=4, alpha=2.0)  # scaling 1
    with torch.no_grad():
        a = torch.randn(2, 16, generator=gen, dtype=torch.float64) * 3
        b = torch.randn(12, 2, generator=gen, dtype=torch.float64) * 3
        if cancelling:  # B_r A_r = 1e-3 c a: small against |B_r||A_r|
            a[1] = a[0]
            b[:, 1] = -b[:, 0] + 1e-3 * torch.randn(12, generator=gen, dtype=torch.float64)
        layer.lora_A[:2] = a.to(dtype)
        layer.lora_B[:, :2] = b.to(dtype)
    return layer


def _bound(w, delta, delta_cast, u_merge, u_now):
    """(1 + u_c) E + u_c |w|, E = (u_m + u_c + u_m u_c)|w + Δ| + |Δ - Δ'|, plus float64 noise."""
    e = (u_merge + u_now + u_merge * u_now) * (w + delta).abs() + (delta - delta_cast).abs()
    return (1 + u_now) * e + u_now * w.abs() + 1e-12 * (w.abs() + delta.abs() + 1)


@pytest.mark.parametrize("cancelling", [False, True])
@pytest.mark.parametrize("merged_in, cast_to", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                                (torch.float16, torch.float32), (torch.bfloat16, torch.float64)])
def test_inexact_unmerge_after_a_cast_is_within_the_documented_bound(merged_in, cast_to, cancelling):
    layer = _layer(merged_in, cancelling)
    w = layer.base_layer.weight.detach().double().clone()
    delta = layer._delta_as_base_layout()  # float64, from the pools as merged
    scaled_abs = layer.scaling * (layer.lora_B[:, :2].double().abs() @ layer.lora_A[:2].double().abs())
    layer.merge(exact=False)
    layer.to(cast_to)
    delta_cast = layer._delta_as_base_layout()  # from the pools as cast
    u_m, u_c = U[merged_in], U[cast_to]
    narrowing = u_c > u_m
    # what docs/model.md states for the pools' term: 2u_c + u_c^2 of |s|(|B_r||A_r|) after a narrowing
    # cast (each factor rounded once), none after a widening one (exact)
    pools_term = (2 * u_c + u_c ** 2) * scaled_abs + 1e-12 * scaled_abs if narrowing else 1e-12 * scaled_abs
    assert ((delta - delta_cast).abs() <= pools_term).all()
    layer.unmerge()
    got = layer.base_layer.weight.detach().double()
    assert layer.base_layer.weight.dtype == cast_to
    err = (got - w).abs()
    stated = _bound(w, delta, delta, u_m, u_c) + (pools_term if narrowing else 0)
    assert (err <= stated).all(), float((err - stated).max())
    if narrowing:  # the bound without a cast, with either dtype's u, does not hold here (10x, 1100x it)
        no_cast = 2 * max(u_m, u_c) * torch.maximum(w.abs(), (w + delta).abs())
        assert (err > no_cast).any()

"""A hypothesis sweep over small shapes, ranks, pools, bias and dropout (kept tiny for 2 CI cores)."""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lora_oracle import assert_close64, make_inputs, multiplier_for, run_all


@st.composite
def cases(draw):
    m = draw(st.integers(1, 40))
    k = draw(st.integers(1, 40))
    n = draw(st.integers(1, 40))
    cap = draw(st.integers(1, min(k, n, 20)))
    rank = draw(st.integers(0, cap))
    return dict(m=m, k=k, n=n, cap=cap, rank=rank, bias=draw(st.booleans()),
                p=draw(st.sampled_from([0.0, 0.0, 0.3])), seed=draw(st.integers(0, 2**62)),
                scaling=draw(st.floats(0.1, 4.0)), lead=draw(st.sampled_from([None, 2])))


@settings(max_examples=int(os.environ.get("LORAMBO_SWEEP_EXAMPLES", "12")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_shape_sweep_matches_float64(case, device):
    m, k = case["m"], case["k"]
    lead = None if case["lead"] is None or m % 2 else (2, m // 2)
    gen = torch.Generator().manual_seed(case["seed"] % 2**31)
    inputs = make_inputs(m, k, case["n"], case["cap"], bias=case["bias"], lead=lead, device=device, gen=gen)
    p = case["p"] if case["rank"] > 0 else 0.0
    mask = multiplier_for(case["seed"], m, k, p, device) if p else None
    if mask is not None and lead is not None:
        mask = mask.reshape(*lead, k)
    y, grads, y64, grads64 = run_all(inputs, case["rank"], case["scaling"], dropout_p=p,
                                     seed=case["seed"] if p else None, mask=mask)
    assert_close64(y, y64, rtol=5e-5, what=f"y {case}")
    for name, g in grads.items():
        assert_close64(g, grads64[name], rtol=5e-5, what=f"d{name} {case}")
    r = case["rank"]
    assert torch.equal(grads["lora_A"][r:], torch.zeros_like(grads["lora_A"][r:]))
    assert torch.equal(grads["lora_B"][:, r:], torch.zeros_like(grads["lora_B"][:, r:]))

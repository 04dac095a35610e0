"""lorambo::pool_adamw_ on bf16/fp16 pools computes in float32 and rounds once per element: one
step equals the float32 op on the widened values, rounded by torch. fp16 runs the float32 loops
themselves (staged through float buffers): equal in every bit. bf16 runs its own instantiation of
the same formula, where the compiler may fuse a multiply-add differently: its float32 value may
differ by one float32 unit, so it must equal the rounding of the float32 result or of a neighbour."""

import pytest
import torch
from ext_testutil import needs_ext

# (shape, slot dim, rank): rows longer than one fp16 staging run (512), and a lora_B-like pool whose
# active columns span more than one run
POOLS = [((5, 1100), 0, 4), ((9, 700), 1, 530), ((3, 7), 0, 3), ((13, 6), 1, 5), ((4, 5), 1, 0)]


def _values(shape, gen, dtype, positive=False):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    scale = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(-30, 8, generator=gen))  # subnormal to huge
    x = x.abs() * scale if positive else x * scale
    return x.to(dtype)


def _assert_rounds_from(low, wide, exact):
    allowed = [wide] if exact else [torch.nextafter(wide, torch.tensor(-float("inf"))), wide,
                                    torch.nextafter(wide, torch.tensor(float("inf")))]
    ok = low.isnan() & wide.isnan()
    for candidate in allowed:
        ok |= low == candidate.to(low.dtype)
    assert bool(ok.all()), (low[~ok][:5], wide[~ok][:5])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad,maximize,weight_decay,beta1", [(False, False, 0.1, 0.9), (True, True, 0.0, 0.9),
                                                                  (False, False, 0.1, 0.2)])
def test_low_precision_step_is_the_float32_step_rounded_once(dtype, amsgrad, maximize, weight_decay, beta1):
    gen = torch.Generator().manual_seed(11)
    shapes, dims, ranks = zip(*POOLS)
    params = [_values(s, gen, dtype) for s in shapes]
    grads = [_values(s, gen, dtype) for s in shapes]
    moments = [[_values(s, gen, dtype, positive=k > 0) for s in shapes] for k in range(3 if amsgrad else 2)]
    steps = [torch.randint(0, 40, (s[d],), generator=gen).float() for s, d in zip(shapes, dims)]
    runs = {}
    for compute in (dtype, torch.float32):
        ps = [p.to(compute, copy=True) for p in params]  # in place: the inputs must survive for the next run
        ms = [[m.to(compute, copy=True) for m in ks] for ks in moments]
        st = [s.clone() for s in steps]
        torch.ops.lorambo.pool_adamw_(ps, [g.to(compute) for g in grads], ms[0], ms[1], ms[2] if amsgrad else [], st,
                                      list(dims), list(ranks), 3e-2, beta1, 0.999, 1e-8, weight_decay, maximize)
        runs[compute] = ps + [m for ks in ms for m in ks]
    changed = 0
    for low, wide, before in zip(runs[dtype], runs[torch.float32], params + [m for ks in moments for m in ks]):
        _assert_rounds_from(low, wide, exact=dtype == torch.float16)
        changed += int(torch.count_nonzero(low != before))
    assert changed > 1000  # the step moved most active elements

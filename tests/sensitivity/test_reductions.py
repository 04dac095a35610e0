"""Batched per-layer reductions against per-tensor float64 loops."""

import torch

from lorambo.sensitivity.reductions import per_layer_dots, per_layer_sq_norms


def test_per_layer_dots_and_norms_match_loops():
    shapes = [(3, 5, 4), (3, 7), (3, 2, 2, 2)]
    xs = [torch.randn(s) for s in shapes]
    ys = [torch.randn(s) for s in shapes]
    got = per_layer_dots(xs, ys)
    want = torch.tensor([[float((x[p].double() * y[p].double()).sum()) for x, y in zip(xs, ys)] for p in range(3)],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    mixed = [torch.randn(6, 5), torch.randn(4).to(torch.bfloat16), torch.randn(2, 3, dtype=torch.float64)]
    want = torch.tensor([float(x.double().square().sum()) for x in mixed], dtype=torch.float64)
    torch.testing.assert_close(per_layer_sq_norms(mixed), want, rtol=1e-5, atol=1e-6)

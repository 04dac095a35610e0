"""per_layer_dots / per_layer_sq_norms: argument checks and the kernel path, against float64 sums.

Written from mutation testing of lorambo/sensitivity/reductions.py.
"""

import pytest
import torch

from lorambo.ops.sketch import set_sketch_backend
from lorambo.sensitivity import reductions
from lorambo.sensitivity.reductions import per_layer_dots, per_layer_sq_norms

pytest.importorskip("triton")


def test_lists_of_different_lengths_are_refused():
    """xs and ys of different lengths are a ValueError naming both lengths, not a silent zip of the
    shorter one."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, 4, generator=gen), torch.randn(3, 2, generator=gen)]
    with pytest.raises(ValueError, match=r"per_layer_dots: 2 tensors vs 1"):
        per_layer_dots(xs, xs[:1])
    with pytest.raises(ValueError, match=r"per_layer_dots: 1 tensors vs 2"):
        per_layer_dots(xs[:1], xs)


def test_requested_kernels_compute_dots_and_norms(monkeypatch):
    """With the sketch kernels requested, both reductions run through the grouped kernel (one call
    each) and give the float64 sums."""
    calls = []
    real = reductions.row_dots
    monkeypatch.setattr(reductions, "row_dots", lambda *a, **k: calls.append(len(a)) or real(*a, **k))
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(3, 5, generator=gen), torch.randn(3, 2, 2, generator=gen)]
    ys = [torch.randn(3, 5, generator=gen), torch.randn(3, 2, 2, generator=gen)]
    set_sketch_backend("triton")
    try:
        dots = per_layer_dots(xs, ys)
        assert calls == [2]
        norms = per_layer_sq_norms(xs)
        assert calls == [2, 1]
    finally:
        set_sketch_backend(None)
    want = torch.stack([(x.double().flatten(1) * y.double().flatten(1)).sum(1) for x, y in zip(xs, ys)], 1)
    torch.testing.assert_close(dots, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms, torch.stack([x.double().square().sum() for x in xs]), rtol=1e-5, atol=1e-6)


def test_no_rows_give_zeros_on_the_inputs_device():
    """Inputs with no rows give (0, L) float64 zeros on the inputs' device, not on the CPU."""
    xs = [torch.empty(0, 3, device="meta"), torch.empty(0, 2, 2, device="meta")]
    got = per_layer_dots(xs, xs)
    assert got.shape == (0, 2) and got.dtype == torch.float64 and got.device.type == "meta"


@pytest.mark.parametrize("backend_name", ["torch", "auto"])
@pytest.mark.parametrize("rows", [0, 3])
def test_a_single_layer_gives_one_column(backend_name, rows):
    """One layer (L = 1), with or without rows, gives a (P, 1) column of its row dots on the PyTorch
    path and on what ``auto`` picks (the compiled extension on CPU where it is built)."""
    import lorambo

    gen = torch.Generator().manual_seed(7 + rows)
    x, y = torch.randn(rows, 2, 3, generator=gen), torch.randn(rows, 2, 3, generator=gen)
    lorambo.set_backend(backend_name)
    try:
        got = per_layer_dots([x], [y])
    finally:
        lorambo.set_backend(None)
    assert got.shape == (rows, 1) and got.dtype == torch.float64
    torch.testing.assert_close(got[:, 0], (x.double() * y.double()).flatten(1).sum(1), rtol=1e-6, atol=1e-6)

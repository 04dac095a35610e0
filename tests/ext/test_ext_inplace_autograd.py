"""The in-place ops of lorambo._C behave as torch's in-place ops towards autograd (csrc/inplace.cpp):
written tensors get their version bumped (a backward through a saved tensor changed since
raises), and writes autograd could not follow are refused before anything is written."""

import pytest
import torch
from ext_testutil import needs_ext

pytestmark = needs_ext

OPS = torch.ops.lorambo if hasattr(torch.ops, "lorambo") else None


def _calls(gen):
    """(op name, call(tensors), the written tensors, the tensors only read) on fresh random data."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    p, g, m, v, steps = rnd(4, 6), rnd(4, 6), rnd(4, 6), rnd(4, 6).abs(), torch.zeros(4)
    adamw = ([p], [g], [m], [v], [], [steps])
    remap = [rnd(4, 3)]
    probe = [rnd(5, 3)]
    counts = [rnd(1), rnd(())]
    zero = [rnd(6, 4)[:, 2:]]
    return [
        ("pool_adamw_", lambda: OPS.pool_adamw_(*adamw, [0], [3], 1e-2, 0.9, 0.99, 1e-8, 0.1, False), [p, m, v, steps],
         [g]),
        ("pool_remap_", lambda: OPS.pool_remap_(remap, [0], [torch.tensor([2, 0, -1, 3])]), remap, []),
        ("probe_fill_", lambda: OPS.probe_fill_(probe, 5, [0], "gaussian"), probe, []),
        ("scalars_add_", lambda: OPS.scalars_add_(counts, 1.0), counts, []),
        ("zero_views_", lambda: OPS.zero_views_(zero), zero, []),
    ]


@pytest.mark.parametrize("index", range(5))
def test_written_tensors_get_their_version_bumped(index):
    name, call, written, read = _calls(torch.Generator().manual_seed(index))[index]
    before = [t._version for t in written + read]
    call()
    after = [t._version for t in written + read]
    assert after == [b + 1 for b in before[:len(written)]] + before[len(written):], name


def test_backward_through_a_parameter_stepped_in_place_raises():
    # lorambo.optim.AdamW steps p.detach() (which shares p's version counter) before backward ran
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 6, generator=gen, requires_grad=True)
    loss = (weight * weight).sum()  # saves weight
    with torch.no_grad():
        OPS.pool_adamw_([weight.detach()], [torch.randn(4, 6, generator=gen)], [torch.zeros(4, 6)],
                        [torch.zeros(4, 6)], [], [torch.zeros(4)], [0], [4], 1e-2, 0.9, 0.99, 1e-8, 0.0, False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("index", range(5))
def test_tensor_requiring_grad_is_refused_under_grad_mode_and_written_under_no_grad(index):
    name, call, written, _ = _calls(torch.Generator().manual_seed(index))[index]
    written[0].requires_grad_(True)
    before = [t.detach().clone() for t in written]
    with pytest.raises(RuntimeError, match=rf"lorambo::{name}: \w+\[0\] requires grad"):
        call()
    assert all(torch.equal(t.detach(), b) for t, b in zip(written, before)), "written before the error"
    with torch.no_grad():
        call()
    assert not torch.equal(written[0].detach(), before[0])


@pytest.mark.parametrize("index", range(5))
def test_inference_tensor_is_refused_outside_inference_mode(index):
    with torch.inference_mode():
        name, call, written, _ = _calls(torch.Generator().manual_seed(index))[index]
    before = [t.clone() for t in written]
    with pytest.raises(RuntimeError, match=rf"lorambo::{name}: \w+\[0\] is an inference tensor"):
        call()
    assert all(torch.equal(t, b) for t, b in zip(written, before)), "written before the error"
    with torch.inference_mode():
        call()
    assert not torch.equal(written[0], before[0])

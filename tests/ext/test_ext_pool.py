"""lorambo::pool_remap_ (pool maintenance) against index_select references and LoRAMBoLinear."""

import pytest
import torch
from ext_testutil import FLOAT_DTYPES, cpu_kernel, generator, needs_ext, random_dtype
from torch import nn

from lorambo import LoRAMBoLinear, reset_slot_state
from lorambo.ext import ops as ext_ops

pytestmark = needs_ext


def reference_remap(t, dim, src):
    """New tensor: slot j along dim = old slot src[j], zeros where src[j] == -1."""
    out = t.index_select(dim, src.clamp(min=0))
    zero = (src < 0).nonzero().flatten()
    return out.index_fill_(dim, zero, 0) if zero.numel() else out


def random_map(cap, gen):
    kind = int(torch.randint(0, 4, (), generator=gen))
    if kind == 0:  # permutation
        return torch.randperm(cap, generator=gen)
    if kind == 1:  # compaction of a random subset, rest zeroed
        n = int(torch.randint(0, cap + 1, (), generator=gen))
        keep = torch.randperm(cap, generator=gen)[:n]
        return torch.cat([keep, torch.full((cap - n,), -1, dtype=torch.long)])
    if kind == 2:  # identity with some slots zeroed (reset moments / zero inactive)
        src = torch.arange(cap)
        src[torch.rand(cap, generator=gen) < 0.3] = -1
        return src
    return torch.randint(-1, cap, (cap,), generator=gen)  # anything, duplicates included


@pytest.mark.parametrize("n", [1, 40, 300])
def test_matches_index_select_reference(n):
    gen = generator()
    tensors, dims, maps, want = [], [], [], []
    for i in range(n):
        cap = int(torch.randint(1, 40, (), generator=gen))
        width = int(torch.randint(0, 50, (), generator=gen)) if i % 7 else 5000  # wide ones span items
        shape, dim = [((cap, width), 0), ((width, cap), 1), ((3, cap, 4), 1), ((cap,), 0)][i % 4]
        t = torch.randn(shape, generator=gen).to(random_dtype(gen))
        src = random_map(cap, gen)
        tensors.append(t)
        dims.append(dim)
        maps.append(src)
        want.append(reference_remap(t, dim, src))
    ext_ops.pool_remap_(tensors, dims, maps)
    for i, (got, exp) in enumerate(zip(tensors, want)):
        assert torch.equal(got, exp), (i, got.shape, dims[i], maps[i])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_negative_slot_dims_and_untouched_identity_slots(dtype):
    t = torch.randn(6, 5, 4).to(dtype)
    keep = t.clone()
    src = torch.tensor([0, 1, 2, 4, 3])
    ext_ops.pool_remap_([t], [-2], [src])
    assert torch.equal(t, reference_remap(keep, 1, src))
    assert torch.equal(t[:, :3], keep[:, :3])


def _layers_with_adam(n, gen):
    layers = [LoRAMBoLinear(nn.Linear(24, 20), rank=6, capacity=8) for _ in range(n)]
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    for layer in layers:
        layer.zero_inactive_()
    return layers, opt


def _snapshot(layers, opt):
    return [t.clone() for layer in layers for p in (layer.lora_A, layer.lora_B)
            for t in [p.data, *[v for v in opt.state[p].values() if v.shape == p.shape]]]


def test_remap_pools_matches_keep_components_with_optimizer_state():
    gen = generator()
    layers, opt = _layers_with_adam(5, gen)
    twins, twin_opt = _layers_with_adam(5, gen)
    for a, b in zip(layers, twins):  # same values, same moments
        b.load_state_dict(a.state_dict())
    twin_opt.load_state_dict(opt.state_dict())
    keeps = [[5, 0, 3], [0, 1, 2, 3, 4, 5], [], [2], [4, 1]]
    for layer, keep in zip(layers, keeps):
        layer.keep_components(keep, optimizer=opt)
    ext_ops.remap_pools_([(t, ext_ops.keep_map(k, 6, 8)) for t, k in zip(twins, keeps)], twin_opt)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(layers, opt), _snapshot(twins, twin_opt)))


def test_reset_maps_match_reset_slot_state_and_zero_inactive():
    gen = generator()
    layers, opt = _layers_with_adam(3, gen)
    twins, twin_opt = _layers_with_adam(3, gen)
    for a, b in zip(layers, twins):
        b.load_state_dict(a.state_dict())
    twin_opt.load_state_dict(opt.state_dict())
    slots = [range(2, 5), [0], range(0, 6)]
    for layer, s in zip(layers, slots):
        reset_slot_state(opt, layer, s)
    # parameters untouched (identity), moments of the listed slots zeroed, in one call
    ident = torch.arange(8)
    zeroing = [torch.tensor([-1 if j in s else j for j in range(8)]) for s in slots]
    ext_ops.remap_pools_([(t, ident) for t in twins], twin_opt, state_maps=zeroing)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(layers, opt), _snapshot(twins, twin_opt)))
    with torch.no_grad():
        twins[0].lora_A[7] = 1.0
        twins[0].lora_B[:, 6:] = 2.0
    ext_ops.remap_pools_([(twins[0], torch.tensor([0, 1, 2, 3, 4, 5, -1, -1]))])  # zero slots 6 and 7
    assert not twins[0].lora_A.detach()[6:].any() and not twins[0].lora_B.detach()[:, 6:].any()
    assert torch.equal(twins[0].lora_A[:6], layers[0].lora_A[:6])


def test_thread_count_independence_and_empty_inputs():
    before = torch.get_num_threads()
    t0 = torch.randn(64, 3000)
    src = torch.randperm(64)
    try:
        torch.set_num_threads(1)
        a = t0.clone()
        ext_ops.pool_remap_([a], [0], [src])
        torch.set_num_threads(max(2, before))
        b = t0.clone()
        ext_ops.pool_remap_([b], [0], [src])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b) and torch.equal(a, reference_remap(t0, 0, src))
    ext_ops.pool_remap_([], [], [])
    empty = torch.empty(4, 0)
    ext_ops.pool_remap_([empty], [0], [torch.tensor([3, 2, 1, 0])])


def test_opcheck():
    tensors = [torch.randn(4, 5), torch.randn(6, 4).to(torch.bfloat16), torch.randn(4, dtype=torch.float64)]
    m = torch.tensor([1, 0, -1, 3])
    torch.library.opcheck(torch.ops.lorambo.pool_remap_.default, (tensors, [0, 1, 0], [m, m, m]))


# ------------------------------------------------------------------------------- bad input
def test_bad_maps_name_the_entry():
    t = [torch.randn(4, 3), torch.randn(3, 4)]
    with pytest.raises(RuntimeError,
                       match=r"maps\[1\]\[2\] = 4 is not a slot of tensors\[1\] \(valid: -1 for zero, or 0..3\)"):
        ext_ops.pool_remap_(t, [0, 1], [[0, 1, 2, 3], [0, 1, 4, 3]])
    with pytest.raises(RuntimeError, match=r"maps\[0\]\[0\] = -2"):
        ext_ops.pool_remap_(t[:1], [0], [[-2, 1, 2, 3]])
    with pytest.raises(RuntimeError, match=r"maps\[0\] has 3 entries but tensors\[0\] has 4 slots along dim 0"):
        ext_ops.pool_remap_(t[:1], [0], [[0, 1, 2]])
    with pytest.raises(RuntimeError, match=r"maps\[0\] must be a 1-D int64 CPU tensor"):
        ext_ops.pool_remap_(t[:1], [0], [torch.tensor([0.0, 1.0, 2.0, 3.0])])


def test_bad_lists_and_tensors():
    t = torch.randn(4, 3)
    m = [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match=r"tensors has 1 entries but slot_dims has 2"):
        torch.ops.lorambo.pool_remap_([t], [0, 1], [torch.tensor(m)])
    with pytest.raises(RuntimeError, match=r"tensors has 1 entries but maps has 2"):
        torch.ops.lorambo.pool_remap_([t], [0], [torch.tensor(m), torch.tensor(m)])
    with pytest.raises(RuntimeError, match=r"slot_dims\[0\] = 2 is out of range for tensors\[0\] with 2 dimensions"):
        ext_ops.pool_remap_([t], [2], [m])
    with pytest.raises(RuntimeError, match=r"tensors\[0\] \(shape \[3, 4\], strides \[1, 3\]\) is not contiguous"):
        ext_ops.pool_remap_([t.t()], [1], [m])
    with pytest.raises(RuntimeError, match=r"tensors\[0\] has dtype Int"):
        ext_ops.pool_remap_([t.int()], [0], [m])
    with pytest.raises(RuntimeError, match=r"tensors\[0\] and tensors\[1\] share memory"):
        ext_ops.pool_remap_([t, t.view(4, 3)], [0, 0], [m, m])
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on meta but the other tensors are on cpu"):
        cpu_kernel(torch.ops.lorambo.pool_remap_)([t, torch.empty(4, 3, device="meta")], [0, 0],
                                                   [torch.tensor(m), torch.tensor(m)])


def test_a_meta_map_is_refused_not_skipped():
    # a meta map sends the call to the fake implementation, which used to return without a remap
    t = torch.randn(4, 3, generator=torch.Generator().manual_seed(12))
    want = t.clone()
    with pytest.raises(RuntimeError, match=r"lorambo::pool_remap_: maps\[0\] must be a 1-D int64 CPU tensor"):
        torch.ops.lorambo.pool_remap_([t], [0], [torch.tensor([1, 0, 2, 3], device="meta")])
    assert torch.equal(t, want)


def test_state_maps_move_per_slot_step_counts_but_not_gradients():
    """remap_pools_ with a state map of its own: the pools and their gradients follow the
    parameter map (identity here), every optimizer state tensor (Adam moments and
    lorambo.optim.AdamW's per-slot step counts) follows the state map (slots 1 and 3 reset)."""
    import lorambo

    gen = generator()
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=1, capacity=4)
    opt = lorambo.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    for rank in (1, 3, 4):  # slot counts 3, 2, 2, 1
        layer.set_rank(rank, optimizer=opt)
        layer.lora_A.grad = torch.randn(layer.lora_A.shape, generator=gen)
        layer.lora_B.grad = torch.randn(layer.lora_B.shape, generator=gen)
        opt.step()
    before = {name: t.clone() for name, t in (("A", layer.lora_A), ("B", layer.lora_B), ("dA", layer.lora_A.grad),
                                               ("dB", layer.lora_B.grad))}
    state = {(id(p), k): v.clone() for p in (layer.lora_A, layer.lora_B) for k, v in opt.state[p].items()}
    ext_ops.remap_pools_([(layer, torch.arange(4))], opt, state_maps=[torch.tensor([0, -1, 2, -1])])
    for name, t in (("A", layer.lora_A), ("B", layer.lora_B), ("dA", layer.lora_A.grad), ("dB", layer.lora_B.grad)):
        assert torch.equal(t, before[name]), name
    for p, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        for key in ("exp_avg", "exp_avg_sq", "slot_step"):
            want = state[(id(p), key)].clone()
            want.index_fill_(dim if want.dim() > 1 else 0, torch.tensor([1, 3]), 0)
            assert torch.equal(opt.state[p][key], want), key
        assert torch.equal(opt.state[p]["slot_step"], torch.tensor([3.0, 0.0, 2.0, 0.0]))


def test_adjacent_views_of_one_buffer_are_not_taken_for_sharing_memory():
    """Pools carved one after the other from one flat buffer touch at a boundary but share no
    element: both are remapped, each as index_select of its own old slots (zeros for -1)."""
    flat = torch.randn(5 * 3 + 4 * 2, generator=generator())
    pools = [flat[:15].view(5, 3), flat[15:].view(4, 2)]
    dims, maps = [0, 1], [torch.tensor([2, 0, -1, 1, 4]), torch.tensor([1, -1])]
    want = []
    for t, dim, m in zip(pools, dims, maps):
        out = t.index_select(dim, m.clamp(min=0))
        want.append(out.index_fill_(dim, (m < 0).nonzero().flatten(), 0))
    torch.ops.lorambo.pool_remap_(pools, dims, maps)
    for got, expected in zip(pools, want):
        assert torch.equal(got, expected)

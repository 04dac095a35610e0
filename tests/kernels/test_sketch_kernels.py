"""Grouped sketch kernels (lorambo_kernels.sketch) against float64 references, under the Triton
interpreter on CPU (and on the GPU when there is one): layers of different sizes and several
calls per layer in one launch, odd sizes, 1 and 64 probe columns."""

import pytest
import torch
import triton
import triton.language as tl

from lorambo_kernels import sketch

# (in, out) per layer and token counts of its calls: odd sizes, partial tiles, a layer with two calls
LAYERS = [((7, 5), [11]), ((19, 13), [17, 3]), ((5, 21), [9])]


def _layers(device, dtype=torch.float32):
    xs, dys, layer_of = [], [], []
    for l, ((n_in, n_out), tokens) in enumerate(LAYERS):
        for t in tokens:
            xs.append(torch.randn(t, n_in, device=device).to(dtype))
            dys.append(torch.randn(t, n_out, device=device).to(dtype))
            layer_of.append(l)
    grads = [sum(dy.double().T @ x.double() for x, dy, ll in zip(xs, dys, layer_of) if ll == l)
             for l in range(len(LAYERS))]
    return xs, dys, layer_of, grads


def _group(xs, dys, layer_of, p, seeds=None, p_used=None):
    return sketch.SketchGroup(xs, dys, layer_of, [s[0] for s, _ in LAYERS], [s[1] for s, _ in LAYERS],
                              p, p_used=p_used, seeds=seeds)


@pytest.mark.parametrize("p", [1, 64])
def test_range_and_corange_with_explicit_matrices_match_float64(device, p):
    xs, dys, layer_of, grads = _layers(device)
    group = _group(xs, dys, layer_of, p)
    v = torch.randn(group.numel(True), device=device)       # [in_l, p] blocks
    u = torch.randn(group.numel(False), device=device)      # [out_l, p] blocks
    y, z = group.apply(v), group.apply(u, adjoint=True)
    for l, g in enumerate(grads):
        n_in, n_out = g.shape[1], g.shape[0]
        vl = v[group.in_offsets[l]:group.in_offsets[l + 1]].view(n_in, p).double()
        ul = u[group.out_offsets[l]:group.out_offsets[l + 1]].view(n_out, p).double()
        torch.testing.assert_close(y[group.out_offsets[l]:group.out_offsets[l + 1]].view(n_out, p).double(),
                                   g @ vl, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(z[group.in_offsets[l]:group.in_offsets[l + 1]].view(n_in, p).double(),
                                   g.T @ ul, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("p", [1, 64])
def test_generated_probes_match_the_materialised_probe(device, p):
    xs, dys, layer_of, grads = _layers(device)
    seeds = [int(s) for s in torch.randint(0, 2**62, (3,))]
    p_used = [p, max(1, p - 3), p]                          # layer 1 uses fewer columns
    group = _group(xs, dys, layer_of, p, seeds, p_used)
    y, z = group.apply(), group.apply(adjoint=True)
    for l, g in enumerate(grads):
        n_in, n_out = g.shape[1], g.shape[0]
        omega = torch.zeros(n_in, p, dtype=torch.float64, device=device)
        omega[:, :p_used[l]] = sketch.gaussian_probe(seeds[l], n_in, p_used[l], device).double()
        psi = torch.zeros(n_out, p, dtype=torch.float64, device=device)
        psi[:, :p_used[l]] = sketch.gaussian_probe(seeds[l], n_out, p_used[l], device).double()
        torch.testing.assert_close(y[group.out_offsets[l]:group.out_offsets[l + 1]].view(n_out, p).double(),
                                   g @ omega, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(z[group.in_offsets[l]:group.in_offsets[l + 1]].view(n_in, p).double(),
                                   g.T @ psi, rtol=1e-5, atol=1e-4)


def _projector(m):
    q = torch.linalg.qr(m).Q
    return q @ q.T


def test_sketch_spans_equal_those_of_the_explicit_gradient(device):
    # rank(G) = T tokens < p: the range sketch spans range(G) exactly, the co-range sketch row(G)
    t, n_in, n_out, p = 4, 13, 11, 8
    x, dy = torch.randn(t, n_in, device=device), torch.randn(t, n_out, device=device)
    group = sketch.SketchGroup([x], [dy], [0], [n_in], [n_out], p, seeds=[12345])
    g = dy.double().T @ x.double()
    u, s, vh = torch.linalg.svd(g)
    y = group.apply().view(n_out, p).double()
    z = group.apply(adjoint=True).view(n_in, p).double()
    uy, sy, _ = torch.linalg.svd(y, full_matrices=False)
    uz, sz, _ = torch.linalg.svd(z, full_matrices=False)
    assert int((sy > 1e-4 * sy[0]).sum()) == t and int((sz > 1e-4 * sz[0]).sum()) == t
    torch.testing.assert_close(_projector(uy[:, :t]), _projector(u[:, :t]), atol=1e-5, rtol=0)
    torch.testing.assert_close(_projector(uz[:, :t]), _projector(vh[:t].T), atol=1e-5, rtol=0)
    # and the span of G Omega for the regenerated probe equals that of the kernel's sketch
    omega = sketch.gaussian_probe(12345, n_in, p, device).double()
    torch.testing.assert_close(_projector(uy[:, :t]), _projector(torch.linalg.svd(g @ omega).U[:, :t]),
                               atol=1e-5, rtol=0)


def test_bfloat16_inputs_accumulate_in_fp32(device):
    xs, dys, layer_of, _ = _layers(device, torch.bfloat16)
    grads = [sum(dy.double().T @ x.double() for x, dy, ll in zip(xs, dys, layer_of) if ll == l) for l in range(3)]
    group = _group(xs, dys, layer_of, 5)
    v = torch.randn(group.numel(True), device=device)
    y = group.apply(v)
    for l, g in enumerate(grads):
        vl = v[group.in_offsets[l]:group.in_offsets[l + 1]].view(g.shape[1], 5).double()
        torch.testing.assert_close(y[group.out_offsets[l]:group.out_offsets[l + 1]].view(g.shape[0], 5).double(),
                                   g @ vl, rtol=1e-5, atol=1e-4)
    # the Gram kernel multiplies 16-bit tiles natively (exact products, fp32 accumulation)
    x, dy = torch.randn(2, 21, 7, device=device).bfloat16(), torch.randn(2, 21, 6, device=device).bfloat16()
    torch.testing.assert_close(sketch.gram_sq_norms([x], [dy])[0].double(),
                               (dy.double().transpose(1, 2) @ x.double()).square().sum((1, 2)),
                               rtol=1e-5, atol=1e-3)


def test_probe_is_gaussian_and_columns_do_not_depend_on_the_count(device):
    wide = sketch.gaussian_probe(7, 301, 64, device)
    narrow = sketch.gaussian_probe(7, 301, 3, device)
    assert torch.equal(wide[:, :3], narrow)
    assert not torch.equal(sketch.gaussian_probe(8, 301, 3, device), narrow)
    assert abs(float(wide.mean())) < 0.02 and abs(float(wide.var()) - 1) < 0.03  # 19264 samples
    assert abs(float(torch.corrcoef(wide.T[:2])[0, 1])) < 0.2


def test_gram_norms_match_per_example_gradients(device):
    # odd token counts over several 16-token tiles, pairs of different sizes and batch sizes
    xs = [torch.randn(3, 37, 7, device=device), torch.randn(2, 5, 33, device=device),
          torch.randn(1, 1, 4, device=device)]
    dys = [torch.randn(3, 37, 6, device=device), torch.randn(2, 5, 3, device=device),
           torch.randn(1, 1, 9, device=device)]
    got = sketch.gram_sq_norms(xs, dys)
    for x, dy, g in zip(xs, dys, got):
        want = (dy.double().transpose(1, 2) @ x.double()).square().sum((1, 2))
        assert g.shape == want.shape
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-4)
    # strided views (a transposed batch) are read through their strides
    x = torch.randn(19, 2, 5, device=device).transpose(0, 1)
    dy = torch.randn(19, 2, 3, device=device).transpose(0, 1)
    torch.testing.assert_close(sketch.gram_sq_norms([x], [dy])[0].double(),
                               (dy.double().transpose(1, 2) @ x.double()).square().sum((1, 2)),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 64])
def test_row_dots_and_square_norms_match_float64(device, rows):
    shapes = [(rows, 3, 5), (rows, 301 if rows == 1 else 37), (rows, 1)]  # 301: several chunks
    xs = [torch.randn(s, device=device) for s in shapes]
    ys = [torch.randn(s, device=device) for s in shapes]
    got = sketch.row_dots(xs, ys)
    sq = sketch.row_dots(xs)
    assert got.dtype == torch.float64 and got.shape == (3, rows)
    for l, (x, y) in enumerate(zip(xs, ys)):
        torch.testing.assert_close(got[l], (x.double().flatten(1) * y.double().flatten(1)).sum(1),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sq[l], x.double().flatten(1).square().sum(1), rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_function_and_the_value(device):
    x, dy = torch.randn(4, 3, device=device), torch.randn(4, 2, device=device)
    with pytest.raises(ValueError, match="SketchGroup.*entry 0 of layer 0"):
        sketch.SketchGroup([x], [dy], [0], [5], [2], 2)
    with pytest.raises(ValueError, match="p=65"):
        sketch.SketchGroup([x], [dy], [0], [3], [2], 65)
    with pytest.raises(ValueError, match="dtype"):
        sketch.SketchGroup([x.double()], [dy.double()], [0], [3], [2], 2)
    with pytest.raises(ValueError, match="layer_of must be sorted"):
        sketch.SketchGroup([x, x], [dy, dy], [1, 0], [3, 3], [2, 2], 2)
    # one table row per layer: a short list left the kernels reading past the table (segfault)
    with pytest.raises(ValueError, match=r"2 in_features, 2 out_features, 2 p_used, 1 seeds"):
        sketch.SketchGroup([x, x], [dy, dy], [0, 1], [3, 3], [2, 2], 2, seeds=[1])
    with pytest.raises(ValueError, match=r"2 in_features, 2 out_features, 1 p_used, 2 seeds"):
        sketch.SketchGroup([x, x], [dy, dy], [0, 1], [3, 3], [2, 2], 2, p_used=[2])
    with pytest.raises(ValueError, match=r"2 in_features, 1 out_features"):
        sketch.SketchGroup([x, x], [dy, dy], [0, 1], [3, 3], [2], 2)
    with pytest.raises(ValueError, match=r"p_used \[3\] must be in \[0, p=2\]"):
        sketch.SketchGroup([x], [dy], [0], [3], [2], 2, p_used=[3])
    with pytest.raises(ValueError, match=r"SketchGroup: seed must be an int in \[0, 2\*\*63\), got -1"):
        sketch.SketchGroup([x], [dy], [0], [3], [2], 2, seeds=[-1])
    group = sketch.SketchGroup([x], [dy], [0], [3], [2], 2)
    with pytest.raises(ValueError, match="apply: v must be"):
        group.apply(torch.randn(5, device=device))
    with pytest.raises(ValueError, match="gram_sq_norms: pair 0"):
        sketch.gram_sq_norms([torch.randn(2, 3, 4, device=device)], [torch.randn(2, 4, 4, device=device)])
    with pytest.raises(ValueError, match="row_dots: tensor 0"):
        sketch.row_dots([torch.randn(3, 4, device=device).T])
    with pytest.raises(ValueError, match="row_dots: no tensors"):
        sketch.row_dots([])
    with pytest.raises(ValueError, match=r"row_dots: xs and ys need equal lengths and shapes, got \[\(3, 4\)\] vs \[\]"):
        sketch.row_dots([torch.randn(3, 4, device=device)], [])
    with pytest.raises(ValueError, match="gram_sq_norms: 0 inputs vs 0 gradients"):
        sketch.gram_sq_norms([], [])


@pytest.mark.parametrize("interpreted", [True, False])
@pytest.mark.parametrize("kind", ["project", "reduce", "gram", "dots"])
def test_block_shapes_are_powers_of_two_tl_arange_takes(kind, interpreted, monkeypatch):
    """Both tables (interpreter and GPU): tl.arange needs power-of-two extents, tl.dot at least 16,
    and num_warps is a power of two."""
    monkeypatch.setattr(sketch, "is_interpreter", lambda: interpreted)
    cfg = sketch.sketch_config(kind, torch.device("cpu" if interpreted else "cuda"))
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    assert blocks and all(v >= 16 and v & (v - 1) == 0 for v in blocks.values()), cfg
    warps = cfg.get("num_warps", 1)  # a GPU launch takes a power of two
    assert warps & (warps - 1) == 0, cfg


def test_explicit_matrices_use_only_the_first_p_used_columns(device):
    # columns past a layer's p_used read as 0 in V (explicit too, not only generated) and stay 0 in
    # Y; V and U are prefixes of buffers with NaN after them, which a read past their end would pick up
    xs, dys, layer_of, grads = _layers(device)
    p, p_used = 6, [6, 2, 5]
    group = _group(xs, dys, layer_of, p, p_used=p_used)
    v, u = (torch.cat([torch.randn(n, device=device), torch.full((1024,), float("nan"), device=device)])[:n]
            for n in (group.numel(True), group.numel(False)))
    y, z = group.apply(v), group.apply(u, adjoint=True)
    for l, g in enumerate(grads):
        n_in, n_out = g.shape[1], g.shape[0]
        vl = v[group.in_offsets[l]:group.in_offsets[l + 1]].view(n_in, p).double()
        ul = u[group.out_offsets[l]:group.out_offsets[l + 1]].view(n_out, p).double()
        vl[:, p_used[l]:], ul[:, p_used[l]:] = 0, 0
        torch.testing.assert_close(y[group.out_offsets[l]:group.out_offsets[l + 1]].view(n_out, p).double(),
                                   g @ vl, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(z[group.in_offsets[l]:group.in_offsets[l + 1]].view(n_in, p).double(),
                                   g.T @ ul, rtol=1e-5, atol=1e-4)


@triton.jit
def _philox_normal(offsets_ptr, out_ptr, seed, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, tl.randn(seed, tl.load(offsets_ptr + i)))


@triton.jit
def _probe_rows(out_ptr, seed, n_rows, first_row, BLOCK: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + tl.arange(0, BLOCK)[:, None] * BLOCK + cols,
             sketch._probe_tile(seed, rows, cols, n_rows, BLOCK))


def _philox_normals(seed, offsets, device):
    """tl.randn(seed, offsets) for int64 offsets computed here: the documented probe entries."""
    n = triton.next_power_of_2(offsets.numel())
    padded = torch.zeros(n, dtype=torch.int64, device=device)
    padded[:offsets.numel()] = offsets.reshape(-1)
    out = torch.empty(n, device=device)
    _philox_normal[(1,)](padded, out, seed, N=n)
    return out[:offsets.numel()].view(offsets.shape)


def test_probe_entry_j_c_is_philox_normal_at_offset_c_n_plus_j(device):
    seed, n, p = 123, 37, 5
    rows, cols = torch.arange(n, device=device)[:, None], torch.arange(p, device=device)[None, :]
    torch.testing.assert_close(sketch.gaussian_probe(seed, n, p, device),
                               _philox_normals(seed, cols * n + rows, device), rtol=1e-6, atol=1e-6)
    # a tall probe: c * n passes 2**31 from column 2 on, so the offsets must be int64; rows past n are 0
    n, block = 2**30 + 7, 16
    got = torch.empty(block, block, device=device)
    _probe_rows[(1,)](got, seed, n, n - 9, BLOCK=block)
    rows = n - 9 + torch.arange(block, device=device)[:, None]
    cols = torch.arange(block, device=device)[None, :]
    want = torch.where(rows < n, _philox_normals(seed, cols * n + rows, device), 0.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got[9:] == 0).all() and (got[:9] != 0).all()


def test_row_dots_rows_past_a_layers_count_are_zero(device):
    # layers of 3, 1 and 2 rows in one launch, each the prefix of a buffer whose next row is NaN:
    # a program past a layer's rows, or a read past a row's end, would pick it up
    counts, widths = [3, 1, 2], [5, 301, 7]

    def rows_then_nan(c, w):
        return torch.cat([torch.randn(c, w, device=device), torch.full((1, w), float("nan"), device=device)])[:c]

    xs = [rows_then_nan(c, w) for c, w in zip(counts, widths)]
    ys = [rows_then_nan(c, w) for c, w in zip(counts, widths)]
    for got, want in ((sketch.row_dots(xs, ys), [(x.double() * y.double()).sum(1) for x, y in zip(xs, ys)]),
                      (sketch.row_dots(xs), [x.double().square().sum(1) for x in xs])):
        assert got.shape == (3, 3)
        for l, (w, c) in enumerate(zip(want, counts)):
            torch.testing.assert_close(got[l, :c], w, rtol=1e-5, atol=1e-5)
            assert (got[l, c:] == 0).all(), got


def test_gram_norms_read_only_inside_each_view(device):
    # each x / dy is a view of a NaN buffer one example, token and feature larger (any read past
    # the view gives NaN); pair 0 has more examples than tokens, pair 2 fewer examples than the launch
    def inside_nan(b, t, d):
        buf = torch.full((b + 1, t + 1, d + 1), float("nan"), device=device)
        buf[:b, :t, :d] = torch.randn(b, t, d, device=device)
        return buf[:b, :t, :d]

    shapes = [(5, 2, 3, 4), (2, 19, 6, 5), (1, 33, 2, 17)]  # (B, T, in, out)
    xs = [inside_nan(b, t, d) for b, t, d, _ in shapes]
    dys = [inside_nan(b, t, d) for b, t, _, d in shapes]
    for x, dy, got in zip(xs, dys, sketch.gram_sq_norms(xs, dys)):
        want = (dy.double().transpose(1, 2) @ x.double()).square().sum((1, 2))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)

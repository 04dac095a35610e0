"""Top singular pairs of projected layer gradients, matrix-free: the marginal benefit of new ranks.

For a layer with captured inputs X [T, in] and output gradients dY [T, out], G = sum dY^T X and
G_perp = (I - Pb) G (I - Pa), Pa / Pb the projectors on the row space of the active A / column
space of the active B (see ``online.py`` for why sigma_j(G_perp) is the gain of the j-th new
rank). sigma_1..sigma_k come from a randomized block power iteration (Halko, Martinsson, Tropp
2011) with k + oversample columns and 2 * niter + 2 products with G or G^T.

:func:`projected_top_singular` does one layer. :func:`projected_top_singular_many` does many
layers in lockstep: each of the 2 * niter + 2 steps is one grouped product over all layers
(``lorambo.ops.sketch.LayerProducts``: the grouped Triton kernels on CUDA, the PyTorch loop
elsewhere), one all-reduce of one flat buffer under DDP, and one batched QR per group of layers
of equal shape; the results of all layers are broadcast from process 0 in one buffer. A single
CPU process, which has neither launches nor collectives to save, keeps the per-layer loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorambo.distributed import SharedFailure, all_reduced_mean, broadcast_, is_distributed
from lorambo.ops.sketch import LayerProducts, kernel_probe, use_sketch_kernels

__all__ = ["subspace_basis", "projected_top_singular", "projected_top_singular_many"]


def subspace_basis(columns: torch.Tensor) -> torch.Tensor | None:
    """Orthonormal basis [n, q] of the span of ``columns`` [n, r], rank-revealing (an SVD with
    LAPACK's usual tolerance, so B = 0 columns contribute nothing); None for an empty span."""
    if columns.shape[1] == 0:
        return None
    u, s, _ = torch.linalg.svd(columns, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    tol = float(s[0]) * max(columns.shape) * torch.finfo(s.dtype).eps
    keep = s > tol
    return u[:, keep]


def _project_out(m: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    return m if basis is None else m - basis @ (basis.transpose(-1, -2) @ m)


def projected_top_singular(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], in_features: int,
                           out_features: int, k: int, a_basis: torch.Tensor | None = None,
                           b_basis: torch.Tensor | None = None, niter: int = 4, oversample: int = 4,
                           generator: torch.Generator | None = None, dtype=None, device=None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` singular values [k] and right singular vectors [in, k] of
    ``(I - Pb) (sum dY^T X) (I - Pa)`` (Pa, Pb: projectors on the given bases), matrix-free.

    The product count is fixed (2 * niter + 2), also on a zero gradient, so DDP processes always
    issue the same collectives. Results are broadcast from process 0.
    """
    if pairs:
        device = pairs[0][0].device if device is None else device
        dtype = torch.promote_types(pairs[0][0].dtype, torch.float32) if dtype is None else dtype
    dtype = dtype or torch.float32
    device = device or torch.device("cpu")
    cast = [(x.to(dtype), dy.to(dtype)) for x, dy in pairs]
    a_basis = None if a_basis is None else a_basis.to(device, dtype)
    b_basis = None if b_basis is None else b_basis.to(device, dtype)

    def mv(v):  # (in, p) -> (out, p): G_perp v
        v = _project_out(v, a_basis)
        out = torch.zeros(out_features, v.shape[1], dtype=dtype, device=device)
        for x, dy in cast:
            out += dy.T @ (x @ v)                                              # (out, p)
        return _project_out(all_reduced_mean(out), b_basis)

    def rmv(u):  # (out, p) -> (in, p): G_perp^T u
        u = _project_out(u, b_basis)
        out = torch.zeros(in_features, u.shape[1], dtype=dtype, device=device)
        for x, dy in cast:
            out += x.T @ (dy @ u)                                              # (in, p)
        return _project_out(all_reduced_mean(out), a_basis)

    p = max(1, min(k + oversample, in_features, out_features))
    omega = torch.randn(in_features, p, generator=generator, dtype=torch.float64).to(device, dtype)
    q = torch.linalg.qr(mv(omega)).Q                                           # (out, p)
    for _ in range(niter):
        q = torch.linalg.qr(mv(torch.linalg.qr(rmv(q)).Q)).Q
    small = rmv(q).T                                                           # (p, in) = Q^T G_perp
    _, sigma, vh = torch.linalg.svd(small, full_matrices=False)
    k = min(k, sigma.numel())
    sigma, vectors = broadcast_(sigma[:k].contiguous()), broadcast_(vh[:k].T.contiguous())
    return sigma, vectors


def _batched_basis(columns: Sequence[torch.Tensor], n: int, dtype, device) -> torch.Tensor | None:
    """Orthonormal bases of the spans of ``columns[g]`` [n, r_g] as one zero-padded [G, n, q]
    tensor (the columns :func:`subspace_basis` would keep, zeros elsewhere); None if all empty."""
    width = max(c.shape[1] for c in columns)
    if width == 0:
        return None
    stacked = torch.zeros(len(columns), n, width, dtype=dtype, device=device)
    for g, c in enumerate(columns):
        stacked[g, :, :c.shape[1]] = c
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)                   # (G, n, w), (G, w)
    ranks = torch.tensor([max(n, c.shape[1]) for c in columns], dtype=s.dtype, device=device)
    tol = s[:, :1] * ranks[:, None] * torch.finfo(s.dtype).eps
    keep = (s > tol) & (s[:, :1] > 0)
    return u * keep[:, None, :].to(u.dtype)


def projected_top_singular_many(pairs: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
                                in_features: Sequence[int], out_features: Sequence[int],
                                ks: Sequence[int], a_columns: Sequence[torch.Tensor],
                                b_columns: Sequence[torch.Tensor], niter: int = 4, oversample: int = 4,
                                generators: Sequence[torch.Generator] | None = None,
                                seeds: Sequence[int] | None = None, dtype=None, device=None,
                                lockstep: bool | None = None, failure: SharedFailure | None = None
                                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """:func:`projected_top_singular` for every layer l at once, in lockstep.

    ``pairs[l]``: captured (X, dY) of layer l; ``ks[l]`` singular pairs wanted;
    ``a_columns[l]`` [in_l, r] / ``b_columns[l]`` [out_l, r] span the directions to project out
    (the active rows of A transposed, the active columns of B; r may be 0).
    Probes: on the PyTorch path ``generators[l]`` draws layer l's Gaussian start as
    :func:`projected_top_singular` does (same numbers as calling it per layer, up to rounding);
    on the kernel path the start is the kernels' Gaussian probe of ``seeds[l]``
    (:func:`lorambo.ops.sketch.kernel_probe`). Either start is projected before the first
    product, as G_perp needs: an unprojected start would sketch G (I - Pa) + G Pa, whose part
    G Pa along the active rows the projection after the product does not remove; where it
    dominates, the sketch misses range(G_perp) and, with ``niter=0``, the gains come out far
    too small.

    ``lockstep``: None runs the lockstep iteration where it saves something (the kernel path,
    CUDA tensors, or a process group: one collective per step instead of one per layer) and
    on a single CPU process the plain per-layer :func:`projected_top_singular` (the same
    arithmetic; the lockstep buffers only add copies there); True / False force either.

    ``failure``: the decision's :class:`lorambo.distributed.SharedFailure`. Each local step
    (products with this process's captured data, projections, QR, SVD) then runs under it and
    each collective carries its flag, so out of memory on one process makes every process
    raise at the next collective instead of leaving the others waiting in it.

    Returns (sigmas [L, max_k] float64 on the CPU, 0 past ks[l]: one host transfer for the
    whole decision; singular values [k_l] and right singular vectors [in_l, k_l] per layer on
    ``device``), identical on every process.
    """
    n = len(pairs)
    if not n == len(in_features) == len(out_features) == len(ks) == len(a_columns) == len(b_columns):
        raise ValueError(f"lorambo.allocation.benefits.projected_top_singular_many: {n} layers but "
                         f"{len(in_features)}/{len(out_features)}/{len(ks)}/{len(a_columns)}/"
                         f"{len(b_columns)} sizes, ks, bases")
    flat = [t for ps in pairs for pair in ps for t in pair]
    device = torch.device(device) if device is not None else (flat[0].device if flat else torch.device("cpu"))
    if dtype is None:
        dtype = torch.float32
        for t in flat:
            dtype = torch.promote_types(dtype, t.dtype)
    if lockstep is None:
        lockstep = (device.type != "cpu" or is_distributed()
                    or (bool(flat) and use_sketch_kernels(flat)))
    if not lockstep:
        return _per_layer(pairs, in_features, out_features, ks, a_columns, b_columns, niter, oversample,
                          generators, dtype, device)
    ps = [max(1, min(k + oversample, i, o)) for k, i, o in zip(ks, in_features, out_features)]
    # layers of equal (in, out, p) are adjacent in the flat buffers: one batched QR per group
    order = sorted(range(n), key=lambda l: (in_features[l], out_features[l], ps[l], l))
    groups: list[list[int]] = []
    for pos, l in enumerate(order):
        if groups and (in_features[order[groups[-1][0]]], out_features[order[groups[-1][0]]],
                       ps[order[groups[-1][0]]]) == (in_features[l], out_features[l], ps[l]):
            groups[-1].append(pos)
        else:
            groups.append([pos])
    width = max(ps)
    dims = {"in": [in_features[l] for l in order], "out": [out_features[l] for l in order]}
    sizes = {side: sum(d) * width for side, d in dims.items()}  # the flat buffers, as LayerProducts lays them
    # the dtype LayerProducts computes in, known without it (the stand-in of a process whose setup failed)
    work = torch.float32 if bool(flat) and use_sketch_kernels(flat) else dtype
    prod = offsets = None
    bases = {"in": [], "out": []}

    def local(fn, *args):  # a step of this process; under ``failure`` skipped once one failed
        return fn(*args) if failure is None else failure.run(fn, *args)

    def setup():
        nonlocal prod, offsets
        prod = LayerProducts([pairs[l] for l in order], [in_features[l] for l in order],
                             [out_features[l] for l in order], width, dtype, device,
                             seeds=None if seeds is None else [int(seeds[l]) for l in order],
                             p_used=[ps[l] for l in order])
        offsets = {"in": prod.in_offsets, "out": prod.out_offsets}
        for members in groups:
            ls = [order[pos] for pos in members]
            bases["in"].append(_batched_basis([a_columns[l].to(device, work) for l in ls], in_features[ls[0]],
                                              work, device))
            bases["out"].append(_batched_basis([b_columns[l].to(device, work) for l in ls], out_features[ls[0]],
                                               work, device))
        if not prod.kernels and generators is None:
            raise ValueError("projected_top_singular_many: the PyTorch path needs generators")
        omega = torch.zeros(prod.numel(True), dtype=work, device=device)
        for pos, l in enumerate(order):
            block = omega[prod.in_offsets[pos]:prod.in_offsets[pos + 1]].view(in_features[l], width)
            if prod.kernels:
                seed = 0 if seeds is None else int(seeds[l])
                block[:, :ps[l]] = kernel_probe(seed, in_features[l], ps[l], device).to(work)
            else:
                block[:, :ps[l]] = torch.randn(in_features[l], ps[l], generator=generators[l],
                                               dtype=torch.float64).to(device, work)
        return omega

    def region(buf, side, g):  # (G, dim, p_g) view of group g in a flat buffer
        first, last = groups[g][0], groups[g][-1] + 1
        view = buf[offsets[side][first]:offsets[side][last]].view(last - first, dims[side][first], width)
        return view[..., :ps[order[first]]]

    padded = any(p < width for p in ps)  # columns past a layer's p stay 0 in every buffer

    def new_buffer(side):
        size = prod.numel(side == "in")
        return (torch.zeros if padded else torch.empty)(size, dtype=work, device=device)

    # Batches of the small per-step ops: a whole group per call on accelerators (few launches);
    # one layer at a time on the CPU, where per-layer matrices stay in cache and a batched call
    # is a loop anyway (batched, the 7B-shaped CPU benchmark ran slower than the per-layer loop).
    batches = [(g, lo, lo + 1) for g, m in enumerate(groups) for lo in range(len(m))] \
        if device.type == "cpu" else [(g, 0, len(m)) for g, m in enumerate(groups)]

    def part(buf, side, g, lo, hi):
        return region(buf, side, g)[lo:hi]

    def basis(side, g, lo, hi):
        b = bases[side][g]
        return None if b is None else b[lo:hi]

    def pre(buf, side):  # project the input directions out
        out = new_buffer(side)
        for g, lo, hi in batches:
            part(out, side, g, lo, hi).copy_(_project_out(part(buf, side, g, lo, hi), basis(side, g, lo, hi)))
        return out

    def product(buf, side_in):  # G_perp (side_in "in") or G_perp^T, before the output projection
        local_product = local(lambda b: prod.apply(b, adjoint=side_in == "out").to(work), buf)
        if failure is None:
            return all_reduced_mean(local_product)
        return failure.mean(local_product, sizes["out" if side_in == "in" else "in"], work, device)

    def orth(buf, side):  # project the output directions out, then QR
        out = new_buffer(side)
        for g, lo, hi in batches:
            projected = _project_out(part(buf, side, g, lo, hi), basis(side, g, lo, hi))
            part(out, side, g, lo, hi).copy_(torch.linalg.qr(projected).Q)
        return out

    def top_pairs(small):  # per group: the singular values and right vectors, packed in one buffer
        sigmas, vhs = [], []
        for g in range(len(groups)):
            z = _project_out(region(small, "in", g), bases["in"][g])            # (G, in, p)
            _, sigma, vh = torch.linalg.svd(z.transpose(1, 2), full_matrices=False)  # (G, q), (G, q, in)
            sigmas.append(sigma)
            vhs.append(vh)
        return sigmas, vhs

    def times_g(buf):  # G_perp on an "in"-side buffer: input directions projected out, then the product
        return product(local(pre, buf, "in"), "in")

    def times_gt(buf):  # G_perp^T on an "out"-side buffer
        return product(local(pre, buf, "out"), "out")

    # randomized subspace iteration: Q = orth(G_perp Omega), then niter rounds of Q = orth(G_perp orth(G_perp^T Q))
    q = local(orth, times_g(local(setup)), "out")
    for _ in range(niter):
        q = local(orth, times_g(local(orth, times_gt(q), "in")), "out")
    found = local(top_pairs, times_gt(q))                                      # from G_perp^T Q
    # one broadcast (process 0's numbers everywhere), then one host copy of all singular values
    packed = local(lambda f: torch.cat([t.flatten() for t in f[0] + f[1]]), found)
    if failure is None:
        packed = broadcast_(packed)
    else:  # q_g = min(p_g, in_g) pairs per layer of group g: sigma [G, q_g], vh [G, q_g, in_g]
        counts = [(len(m), min(ps[order[m[0]]], dims["in"][m[0]]), dims["in"][m[0]]) for m in groups]
        packed = failure.broadcast(packed, sum(c * q * (1 + i) for c, q, i in counts), work, device)
    sigmas, vhs = found
    pos = 0
    for i, t in enumerate(sigmas + vhs):
        view = packed[pos:pos + t.numel()].view(t.shape)
        pos += t.numel()
        (sigmas if i < len(sigmas) else vhs)[i % len(sigmas)] = view
    host = packed[:sum(t.numel() for t in sigmas)].double().cpu()
    max_k = max(ks) if ks else 0
    sigmas_host = torch.zeros(n, max_k, dtype=torch.float64)
    out_sigmas: list = [None] * n
    out_vectors: list = [None] * n
    start = 0
    for g, members in enumerate(groups):
        g_host = host[start:start + sigmas[g].numel()].view(sigmas[g].shape)
        start += sigmas[g].numel()
        for j, pos in enumerate(members):
            l = order[pos]
            k = min(ks[l], sigmas[g].shape[1])
            sigmas_host[l, :k] = g_host[j, :k]
            out_sigmas[l] = sigmas[g][j, :k]
            out_vectors[l] = vhs[g][j, :k].T                                    # (in, k) view
    return sigmas_host, out_sigmas, out_vectors


def _per_layer(pairs, in_features, out_features, ks, a_columns, b_columns, niter, oversample, generators,
               dtype, device):
    """:func:`projected_top_singular_many`'s results from the per-layer loop (single CPU process)."""
    if generators is None:
        raise ValueError("projected_top_singular_many: the PyTorch path needs generators")
    n = len(pairs)
    sigmas_host = torch.zeros(n, max(ks) if ks else 0, dtype=torch.float64)
    out_sigmas, out_vectors = [], []
    for l in range(n):
        a_basis = subspace_basis(a_columns[l].to(device, dtype))
        b_basis = subspace_basis(b_columns[l].to(device, dtype))
        sigma, vectors = projected_top_singular(pairs[l], in_features[l], out_features[l], ks[l], a_basis, b_basis,
                                                niter, oversample, generators[l], dtype, device)
        sigmas_host[l, :sigma.numel()] = sigma.double()
        out_sigmas.append(sigma)
        out_vectors.append(vectors)
    return sigmas_host, out_sigmas, out_vectors

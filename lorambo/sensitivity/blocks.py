"""Products with the diagonal Hessian blocks H_ii of every layer, batched across layers.

For the joint Hessian over all targeted weights, (Hv)_i = sum_j H_ij v_j mixes layers. A probe
that is nonzero on layer i only gives (Hv)_i = H_ii v_i exactly, so per-layer sketches (Hutch++,
XTrace, power iteration) send *layer-restricted* probes: column c of layer i's block X_i becomes
a full probe that is X_i[:, c] on layer i and 0 elsewhere, and only block i of its product is
kept. Probes of different layers share one pass (one forward/backward per batch), which serves
all layers; the price is one product per layer and column (vs one per column for the joint
Hutchinson probes), which is why those methods cost L times more products than Hutchinson.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .hvp import HessianOperator

__all__ = ["block_products", "run_programs"]


def block_products(op: HessianOperator, blocks: dict[int, torch.Tensor], probes_per_pass: int,
                   done: Callable[[int], object] | None = None) -> dict[int, torch.Tensor]:
    """{layer i: X_i [d_i, m_i]} -> {layer i: H_ii X_i [d_i, m_i]} (in X_i's dtype). ``done(n)``
    is called after each pass with its number of products (a progress bar's ``update``)."""
    columns = [(i, c) for i, x in blocks.items() for c in range(x.shape[1])]
    out = {i: torch.empty_like(x) for i, x in blocks.items()}
    weights = op.weights
    for start in range(0, len(columns), probes_per_pass):
        chunk = columns[start:start + probes_per_pass]
        vs = [torch.zeros((len(chunk),) + tuple(w.shape), dtype=w.dtype, device=w.device)
              for w in weights]
        for p, (i, c) in enumerate(chunk):
            vs[i][p] = blocks[i][:, c].reshape(weights[i].shape).to(weights[i].dtype)

        def own_blocks(hvs, chunk=chunk):  # probe p keeps block i of its product only
            return [hvs[i][p].reshape(-1) for p, (i, _) in enumerate(chunk)]

        res = op.apply(vs, own_blocks)                                     # P rows of (d_i,)
        for p, (i, c) in enumerate(chunk):
            out[i][:, c] = res[p].to(out[i].dtype)
        if done is not None:
            done(len(chunk))
    return out


def run_programs(op: HessianOperator, programs: dict[int, object], probes_per_pass: int,
                 done: Callable[[int], object] | None = None) -> dict:
    """Drive one sketch program per layer in lockstep; {layer: what its program returns}
    (``done``: see :func:`block_products`)."""
    results, pending = {}, {}
    for i, prog in programs.items():
        try:
            pending[i] = (prog, next(prog))
        except StopIteration as stop:
            results[i] = stop.value
    while pending:
        products = block_products(op, {i: x for i, (_, x) in pending.items()}, probes_per_pass, done)
        nxt = {}
        for i, (prog, _) in pending.items():
            try:
                nxt[i] = (prog, prog.send(products[i]))
            except StopIteration as stop:
                results[i] = stop.value
        pending = nxt
    return results

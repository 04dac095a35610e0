"""Per-layer statistics of many layers at once: the grouped sketch kernels or the PyTorch loop.

Which path runs is chosen by :func:`set_sketch_backend` or, when never set, ``$LORAMBO_SKETCH``:

- ``auto`` (default): the grouped Triton kernels (``lorambo_kernels.sketch``) when every tensor
  is a CUDA tensor of a kernel dtype (fp32, fp16, bf16) and Triton is installed; the PyTorch
  loop otherwise (CPU included).
- ``triton``: the kernels, or a RuntimeError saying why they cannot run (on CPU they run under
  ``TRITON_INTERPRET=1``; that is how the tests exercise them).
- ``torch``: always the PyTorch loop.

The kernels accumulate in fp32; the PyTorch loop in the dtype it is given (float64 stays
float64). Both give the same statistics up to that rounding, and the callers reduce both through
the same flat buffers (one collective for all layers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

__all__ = ["SKETCH_BACKENDS", "set_sketch_backend", "get_sketch_backend", "use_sketch_kernels",
           "LayerProducts", "sq_grad_norms_many", "row_dots", "kernel_probe"]

SKETCH_BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_PROBES = 64  # probe columns one kernel launch handles
_ENV_VAR = "LORAMBO_SKETCH"
_override: str | None = None


def _check(name: str, source: str) -> str:
    value = str(name).strip().lower()
    if value not in SKETCH_BACKENDS:
        raise ValueError(f"lorambo.ops.sketch: unknown sketch backend {name!r} from {source}; "
                         f"choose one of {SKETCH_BACKENDS}")
    return value


def set_sketch_backend(name: str | None) -> None:
    """Select the path of the per-layer statistics; ``None`` returns to ``$LORAMBO_SKETCH``."""
    global _override
    _override = None if name is None else _check(name, "set_sketch_backend")


def get_sketch_backend() -> str:
    if _override is not None:
        return _override
    return _check(os.environ.get(_ENV_VAR, "auto"), f"${_ENV_VAR}")


def _kernels_unavailable(tensors: Sequence[torch.Tensor]) -> str | None:
    from lorambo_kernels.config import unavailable_reason

    for device_type in dict.fromkeys(t.device.type for t in tensors):
        if (reason := unavailable_reason(device_type)) is not None:
            return reason
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return f"a tensor has dtype {t.dtype} (kernels take {KERNEL_DTYPES})"
        if t.requires_grad and torch.is_grad_enabled():
            return "a tensor requires grad (the kernels are not differentiable)"
    return None


def use_sketch_kernels(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether statistics of ``tensors`` go through the grouped kernels (see the module doc)."""
    requested = get_sketch_backend()
    if requested == "torch" or not tensors:
        return False
    reason = _kernels_unavailable(tensors)
    if requested == "triton":
        if reason is not None:
            raise RuntimeError(f"lorambo.ops.sketch: sketch backend 'triton' was requested but "
                               f"cannot run: {reason}")
        return True
    return reason is None and all(t.device.type == "cuda" for t in tensors)


def _sketch_module():
    import lorambo_kernels.sketch as sketch  # lazily: triton is optional

    return sketch


class LayerProducts:
    """``G_l V_l`` and ``G_l^T U_l`` for layers l = 0..L-1, G_l = sum over its captured calls of
    dY^T X ([out_l, in_l]), never formed. Inputs and outputs are flat buffers holding layer l's
    [in_l, p] / [out_l, p] block (row-major) at ``in_offsets[l]`` / ``out_offsets[l]``, so one
    collective reduces every layer.

    ``pairs[l]``: list of (X [T, in_l], dY [T, out_l]) (may be empty: G_l = 0). ``p``: columns.
    ``seeds[l]``: seed of layer l's in-kernel Gaussian probe (kernel path, ``apply(None)``).
    ``p_used[l]``: columns layer l uses, of a generated or an explicit probe alike (the other
    columns of its output are 0; default: all ``p``).
    ``dtype``: working dtype of the PyTorch path (the kernels work in fp32).
    """

    def __init__(self, pairs, in_features, out_features, p: int, dtype=torch.float32, device=None,
                 seeds=None, p_used=None):
        self.in_features = [int(d) for d in in_features]
        self.out_features = [int(d) for d in out_features]
        if not len(pairs) == len(self.in_features) == len(self.out_features):
            raise ValueError(f"lorambo.ops.sketch.LayerProducts: {len(pairs)} pair lists for "
                             f"{len(self.in_features)} / {len(self.out_features)} layer sizes")
        if not 1 <= int(p) <= MAX_PROBES:
            raise ValueError(f"lorambo.ops.sketch.LayerProducts: p={p} columns (1..{MAX_PROBES})")
        self.p = int(p)
        self.p_used = [self.p] * len(self.in_features) if p_used is None else [int(q) for q in p_used]
        if len(self.p_used) != len(self.in_features) or not all(0 <= q <= self.p for q in self.p_used):
            raise ValueError(f"lorambo.ops.sketch.LayerProducts: p_used {self.p_used} must give one count in "
                             f"[0, p={self.p}] per layer ({len(self.in_features)})")
        flat = [t for ps in pairs for pair in ps for t in pair]
        self.device = torch.device(device) if device is not None else (
            flat[0].device if flat else torch.device("cpu"))
        self.in_offsets = _offsets(self.in_features, self.p)
        self.out_offsets = _offsets(self.out_features, self.p)
        self.kernels = bool(flat) and use_sketch_kernels(flat)
        if self.kernels:
            self.dtype = torch.float32
            common = flat[0].dtype
            for t in flat:
                common = torch.promote_types(common, t.dtype)
            if any(t.dtype != common for t in flat):  # one pointer type per launch
                pairs = [[(x.to(common), dy.to(common)) for x, dy in ps] for ps in pairs]
                flat = [t for ps in pairs for pair in ps for t in pair]
            xs, dys, layer_of = [], [], []
            for l, ps in enumerate(pairs):
                if not ps:  # a layer without data: one empty entry keeps the tables dense
                    ps = [(torch.empty(0, self.in_features[l], dtype=flat[0].dtype, device=self.device),
                           torch.empty(0, self.out_features[l], dtype=flat[0].dtype, device=self.device))]
                for x, dy in ps:
                    xs.append(x)
                    dys.append(dy)
                    layer_of.append(l)
            self._group = _sketch_module().SketchGroup(xs, dys, layer_of, self.in_features,
                                                       self.out_features, self.p, p_used, seeds)
        else:
            self.dtype = dtype
            self._pairs = [[(x.to(self.device, dtype), dy.to(self.device, dtype)) for x, dy in ps]
                           for ps in pairs]

    def numel(self, adjoint: bool = False) -> int:
        """Elements of the output of :meth:`apply` (its input has ``numel(not adjoint)``)."""
        return (self.in_offsets if adjoint else self.out_offsets)[-1]

    def blocks(self, flat: torch.Tensor, side: str) -> list[torch.Tensor]:
        """Views [dim_l, p] of a flat buffer; side ``in`` or ``out``."""
        offs, dims = ((self.in_offsets, self.in_features) if side == "in"
                      else (self.out_offsets, self.out_features))
        return [flat[offs[l]:offs[l + 1]].view(dims[l], self.p) for l in range(len(dims))]

    def apply(self, v: torch.Tensor | None, adjoint: bool = False) -> torch.Tensor:
        """Flat G_l V_l (adjoint: G_l^T V_l) for the flat ``v``; ``v=None`` uses the in-kernel
        probes (kernel path only: the PyTorch path takes its probes explicitly)."""
        if self.kernels:
            if v is not None:
                v = v.to(torch.float32).contiguous()
            return self._group.apply(v, adjoint)
        if v is None:
            raise ValueError("lorambo.ops.sketch.LayerProducts.apply: the PyTorch path needs explicit probes")
        src = self.blocks(v.to(self.dtype), "out" if adjoint else "in")
        out = torch.empty(self.numel(adjoint), dtype=self.dtype, device=self.device)
        dst = self.blocks(out, "in" if adjoint else "out")
        for l, ps in enumerate(self._pairs):
            q = self.p_used[l]  # the kernels read only these columns of the probe
            if not ps or q == 0:
                dst[l].zero_()
                continue
            dst[l][:, q:].zero_()
            for i, (x, dy) in enumerate(ps):
                v_l = src[l][:, :q]
                left, right = (x.T, dy @ v_l) if adjoint else (dy.T, x @ v_l)  # (in|out, q)
                if i == 0:
                    dst[l][:, :q] = left @ right
                else:
                    dst[l][:, :q].addmm_(left, right)
        return out


def _offsets(dims, p) -> list[int]:
    out, pos = [], 0
    for d in dims:
        out.append(pos)
        pos += d * p
    return out + [pos]


def sq_grad_norms_many(xs: Sequence[torch.Tensor], dys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """||dY_n^T X_n||_F^2 per example n for each pair (x [B, T, in], dy [B, T, out]) through the
    grouped Gram kernel (one launch for all pairs); [B] fp32 tensors. Kernel path only: callers
    check :func:`use_sketch_kernels` first."""
    return _sketch_module().gram_sq_norms(list(xs), list(dys))


def row_dots(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """float64 (P, L): <xs[l][p], ys[l][p]> (or ||xs[l][p]||^2) for tensors [P, ...], one kernel
    launch per dtype (x and y of a pair share it)."""
    xs = [x.contiguous() for x in xs]
    ys = None if ys is None else [y.to(x.dtype).contiguous() for x, y in zip(xs, ys)]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(xs):
        by_dtype.setdefault(x.dtype, []).append(i)
    rows = max(x.shape[0] if x.dim() > 1 else 1 for x in xs)
    out = torch.zeros(rows, len(xs), dtype=torch.float64, device=xs[0].device)
    for idx in by_dtype.values():
        got = _sketch_module().row_dots([xs[i] for i in idx], None if ys is None else [ys[i] for i in idx])
        out[:got.shape[1], idx] = got.T
    return out


def kernel_probe(seed: int, n: int, p: int, device) -> torch.Tensor:
    """The [n, p] fp32 Gaussian probe the kernels generate for ``seed`` (for tests and checks)."""
    return _sketch_module().gaussian_probe(seed, n, p, device)

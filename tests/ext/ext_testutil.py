"""Shared helpers for the compiled-extension tests (imported by tests/ext/test_ext_*.py).

The tests skip when lorambo._C was not built (LORAMBO_SKIP_EXT=1 installs); with
LORAMBO_REQUIRE_EXT=1 (CI) a missing extension is an error instead of a skip.
"""

import os

import pytest
import torch

from lorambo.ext import loader as ext_loader

EXT = ext_loader.load()
if EXT is None and os.environ.get("LORAMBO_REQUIRE_EXT") == "1":
    raise RuntimeError(f"LORAMBO_REQUIRE_EXT=1 but lorambo._C is not available: {ext_loader._state.get('error')}")

needs_ext = pytest.mark.skipif(EXT is None, reason="compiled extension lorambo._C not built")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def random_shape(gen: torch.Generator, max_elems: int = 600):
    """A random shape with 0-3 dimensions, sometimes holding zero elements."""
    ndim = int(torch.randint(0, 4, (), generator=gen))
    shape = [int(torch.randint(0, 12, (), generator=gen)) for _ in range(ndim)]
    numel = 1
    for s in shape:
        numel *= s
    return tuple(shape) if numel <= max_elems else tuple(min(s, 8) for s in shape)


def random_dtype(gen: torch.Generator, dtypes=FLOAT_DTYPES):
    return dtypes[int(torch.randint(0, len(dtypes), (), generator=gen))]


def generator():
    """A generator seeded from the test's global seed (tests/conftest.py seeds per test)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))


def cpu_kernel(op):
    """Call the CPU kernel directly (bypassing the Meta/fake dispatch a meta tensor would pick)."""
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return lambda *args: op.default.redispatch(keyset, *args)


U32, U64 = 2.0 ** -24, 2.0 ** -53
# csrc/cpu/multi_tensor_cpu.cpp and csrc/cuda/multi_tensor.cu: each product rounded once to
# float32 (exact for bf16/fp16 operands), sums of 8 of them in float32 (gamma_7 = 7u / (1 - 7u)),
# the rest in float64 (lanes or threads over a chunk, chunks, rows: far fewer than 2000 adds)
ACCUMULATION_BOUND = 8 * U32 / (1 - 7 * U32) + 2000 * U64


def check_within_accumulation_bound(got, xs, ys, rows=1):
    """|got - exact| <= ACCUMULATION_BOUND * sum |x y| per entry, the exact value in float64."""
    assert got.dtype == torch.float64 and got.shape == (rows, len(xs))
    got = got.cpu()
    for i, (x, y) in enumerate(zip(xs, ys)):
        prod = (x.cpu().double() * y.cpu().double()).reshape(rows, -1)
        want, scale = prod.sum(1), prod.abs().sum(1)
        err = (got[:, i] - want).abs()
        assert bool((err <= ACCUMULATION_BOUND * scale + 1e-30).all()), (i, x.shape, x.dtype, y.dtype, got[:, i], want)

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

"""The op backends that run on CPU here, as pytest params: the PyTorch reference, the compiled
extension when built, and the Triton kernels when the interpreter can run them."""

import pytest

from lorambo.ext import loader as ext_loader


def _triton_runs_on_cpu() -> bool:
    try:
        from lorambo_kernels.config import unavailable_reason
    except ImportError:
        return False
    return unavailable_reason("cpu") is None


BACKENDS = [
    "torch",
    pytest.param("ext", marks=pytest.mark.skipif(ext_loader.load() is None, reason="extension not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_runs_on_cpu(), reason="no Triton interpreter")),
]

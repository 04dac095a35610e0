"""The op backends that run on CPU here, as pytest params: the PyTorch reference, the compiled
extension when built, and the Triton kernels when the interpreter can run them; and each
backend's public op."""

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


# each backend's public op, by the name its errors carry
OPS = {"torch": "lora_linear_reference", "ext": "lora_linear_ext", "triton": "lora_linear_triton"}


def op_for(backend):
    """The backend's public op, imported when asked (the Triton one needs the kernels)."""
    if backend == "torch":
        from lorambo.ops.lora_linear_ref import lora_linear_reference

        return lora_linear_reference
    if backend == "ext":
        from lorambo.ops.ext_linear import lora_linear_ext

        return lora_linear_ext
    from lorambo.ops.triton_linear import lora_linear_triton

    return lora_linear_triton

"""Backend selection for the LoRA op: ``auto``, ``torch``, ``triton`` or ``ext``.

The choice comes from ``lorambo.set_backend`` or, when never set, the ``LORAMBO_BACKEND``
environment variable (read at each call, so tests can flip it). An explicitly requested
backend that cannot run raises; only ``auto`` chooses for the user: the compiled extension on
CPU when it is built (float32/float64/bfloat16), else the PyTorch reference.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "ext")
EXT_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # csrc/cpu/lora_linear_cpu.cpp
_ENV_VAR = "LORAMBO_BACKEND"
_override: str | None = None


def _check(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"unknown lorambo backend {name!r} from {source}; choose one of {BACKENDS}")
    return value


def set_backend(name: str | None) -> None:
    """Select the backend for every LoRAMBoLinear; ``None`` returns to ``$LORAMBO_BACKEND``."""
    global _override
    _override = None if name is None else _check(name, "lorambo.set_backend")


def get_backend() -> str:
    """The requested backend name (``auto`` unless set)."""
    if _override is not None:
        return _override
    return _check(os.environ.get(_ENV_VAR, "auto"), f"${_ENV_VAR}")


def resolve_backend(device_type: str, dtype: torch.dtype | None = None) -> str:
    """The backend that will run on ``device_type`` (for ``dtype``): ``auto`` resolved, others verified."""
    requested = get_backend()
    if requested == "auto":
        # CPU: the compiled op when it loaded and supports the dtype (it matches the reference to
        # rounding, the whole suite passes on it, and benchmarks/results/ext_cpu.md measured it
        # faster than peft-style eager LoRA); otherwise the PyTorch reference.
        # CUDA: the fused Triton kernels pass their tests under the Triton interpreter and compile
        # for sm_90 ahead of time, but have not yet run on a GPU (issue 3); until they have, auto
        # keeps the PyTorch reference there. LORAMBO_BACKEND=triton opts in.
        if device_type == "cpu" and (dtype is None or dtype in EXT_CPU_DTYPES):
            from lorambo import _extension

            if _extension.load() is not None:
                return "ext"
        return "torch"
    if requested == "triton":
        from lorambo.ops.triton_linear import triton_unavailable_reason

        reason = triton_unavailable_reason(device_type)
        if reason is not None:
            raise RuntimeError(f"lorambo backend 'triton' was requested but cannot run: {reason}")
    if requested == "ext":
        from lorambo import _extension

        _extension.require()
    return requested


def use_compiled_multi_tensor(tensors) -> bool:
    """Whether a multi-tensor reduction / pool op over ``tensors`` runs in the compiled extension.

    ``torch``: never. ``ext``: always (raises without the extension). ``auto`` / ``triton``: when
    the extension loaded and every tensor is a contiguous CPU tensor outside autograd, the case
    benchmarks/bench_ext.py measured faster than the ``torch._foreach`` / loop paths; its CUDA
    kernels have not run on a GPU yet (issue 6), so CUDA tensors keep the PyTorch path.
    """
    requested = get_backend()
    if requested == "torch":
        return False
    from lorambo import _extension

    if requested == "ext":
        _extension.require()
        return True
    return (_extension.load() is not None
            and all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in tensors))

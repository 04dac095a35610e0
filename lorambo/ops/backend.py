"""Backend selection for the LoRA op: ``auto``, ``torch``, ``triton`` or ``ext``.

The requested backend comes from ``lorambo.set_backend(name)`` or, when never set, from the
``LORAMBO_BACKEND`` environment variable, read once at first use. ``set_backend(None)`` re-reads
the variable (how tests and tools that change it after import make it count). An explicitly
requested backend that cannot run raises; only ``auto`` chooses for the user: the compiled
extension on CPU when it is built (float32/float64/bfloat16), else the PyTorch reference.

Resolution happens once per (request, device type, dtype): the environment read, the import of
the extension or of Triton and the availability checks run the first time and are cached, so a
forward pass does none of them. Under ``torch.compile`` the cached answer is a constant of the
graph, guarded by a generation counter that :func:`set_backend` bumps, so switching the backend
takes effect at the next call (one recompile) and never breaks the graph. The dispatch that
uses the answer is :mod:`lorambo.ops.dispatch`; docs/architecture.md describes both.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "ext")
EXT_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # csrc/cpu/lora_linear_cpu.cpp
_ENV_VAR = "LORAMBO_BACKEND"

_requested: str | None = None  # None: not read yet
_generation = 0  # bumped by set_backend; compiled graphs guard on it
_resolved: dict[tuple, str] = {}


def _check(name: str, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source}: the backend must be a string, one of {BACKENDS}; got {name!r}")
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"unknown lorambo backend {name!r} from {source}; choose one of {BACKENDS}")
    return value


def set_backend(name: str | None) -> None:
    """Select the backend for every LoRAMBoLinear, effective at the next call (compiled models
    recompile once). ``None`` re-reads ``$LORAMBO_BACKEND`` now (``auto`` when unset or empty).
    ``ValueError`` for a name (or ``$LORAMBO_BACKEND``) not in ``auto``, ``torch``, ``triton``,
    ``ext``; ``TypeError`` for a name that is not a string. A backend that cannot run on a
    device is refused by the forward that would use it (``RuntimeError``), not here."""
    global _requested, _generation
    if name is None:
        # set but empty (`LORAMBO_BACKEND= cmd`) means unset, as for most tools' variables
        _requested = _check(os.environ.get(_ENV_VAR) or "auto", f"${_ENV_VAR}")
    else:
        _requested = _check(name, "lorambo.set_backend")
    _generation += 1
    _resolved.clear()


def get_backend() -> str:
    """The requested backend name (``auto`` unless set); reads ``$LORAMBO_BACKEND`` on first use,
    a ``ValueError`` when that names no backend."""
    if _requested is None:
        set_backend(None)
    return _requested  # type: ignore[return-value]


def resolve_backend(device_type: str, dtype: torch.dtype | None = None) -> str:
    """The backend that will run on ``device_type`` (for ``dtype``): ``auto`` resolved, others verified.

    Cached after the first call for each (device type, dtype); a compiled graph holds the answer
    as a constant and recompiles when :func:`set_backend` changes it.
    """
    return _resolved_for(_generation, device_type, dtype)


def _resolved_for(generation: int, device_type: str, dtype: torch.dtype | None) -> str:
    key = (generation, device_type, dtype)
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolve(device_type, dtype)
        if generation == _generation:
            _resolved[key] = hit
    return hit


# What torch._dynamo.assume_constant_result(_resolved_for) does, without importing torch._dynamo
# (seconds, and it imports triton) with lorambo: Dynamo calls the function at trace time and
# records its result as a constant, so no import, env read or availability check is traced; the
# guard on the module global ``_generation`` read in resolve_backend retraces after set_backend.
_resolved_for._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _resolve(device_type: str, dtype: torch.dtype | None) -> str:
    requested = get_backend()
    if requested == "auto":
        # CPU: the compiled op when it loaded and supports the dtype (it matches the reference to
        # rounding, the whole suite passes on it, and benchmarks/results/ext_cpu.md measured it
        # faster than peft-style eager LoRA); otherwise the PyTorch reference.
        # CUDA: the fused Triton kernels pass their tests under the Triton interpreter and compile
        # for sm_90 ahead of time, but have not yet run on a GPU; until they have, auto keeps the
        # PyTorch reference there. LORAMBO_BACKEND=triton opts in.
        if device_type == "cpu" and (dtype is None or dtype in EXT_CPU_DTYPES):
            from lorambo.ext import loader as ext_loader

            if ext_loader.load() is not None:
                return "ext"
        return "torch"
    if requested == "triton":
        from lorambo_kernels.config import unavailable_reason

        reason = unavailable_reason(device_type)
        if reason is not None:
            raise RuntimeError(f"lorambo backend 'triton' was requested but cannot run: {reason}")
    if requested == "ext":
        from lorambo.ext import loader as ext_loader

        ext_loader.require()
    return requested


def use_compiled_multi_tensor(tensors) -> bool:
    """Whether a multi-tensor reduction / pool op over ``tensors`` runs in the compiled extension.

    ``torch``: never. ``ext``: always (raises without the extension). ``auto`` / ``triton``: when
    the extension loaded and every tensor is a contiguous CPU tensor outside autograd, the case
    benchmarks/bench_ext.py measured faster than the ``torch._foreach`` / loop paths; its CUDA
    kernels have not run on a GPU yet, so CUDA tensors keep the PyTorch path.
    """
    where = compiled_multi_tensor_where()
    return where == "any" or (where == "cpu" and all(map(ready_on_cpu, tensors)))


def compiled_multi_tensor_where() -> str | None:
    """The backend switch's part of :func:`use_compiled_multi_tensor`: None (never), ``"any"``
    (``ext``; raises without the extension) or ``"cpu"`` (tensors that pass :func:`ready_on_cpu`)."""
    requested = get_backend()
    if requested == "torch":
        return None
    from lorambo.ext import loader as ext_loader

    if requested == "ext":
        ext_loader.require()
        return "any"
    return "cpu" if ext_loader.load() is not None else None


def ready_on_cpu(tensor: torch.Tensor) -> bool:
    """A contiguous CPU tensor outside autograd: what the compiled CPU ops take under ``auto``."""
    # is_cpu, not device.type == "cpu": the same answer without a torch.device object per tensor,
    # which would be most of this check's cost (a lorambo.optim.AdamW step passes 5 tensors per pool)
    return tensor.is_cpu and tensor.is_contiguous() and not tensor.requires_grad

"""lorambo_kernels: Triton kernels for lorambo (imports triton and torch only, never lorambo).

Installed from kernels/lorambo_kernels as its own top-level package; kernels/ itself has no
__init__.py so that nothing becomes importable as ``kernels`` (transformers probes that name).

Modules (one per kernel family; each holds its ``@triton.jit`` kernels, then its launcher):
  config       rank buckets, block shapes per shape bucket, the TMA switch (no kernels)
  dropout      the counter-based (philox) dropout mask shared by every kernel
  fused_gemm   the fused GEMM with the LoRA epilogue (forward y, backward dX, dW)
  lora_skinny  the skinny GEMMs: down-projection [M, r] and pool gradients [P, r]
  lora_linear  forward/backward of the LoRA linear layer as sequences of those launches
  sketch       grouped per-layer statistics (range/co-range sketches, Gram norms, row dots)

The public names below import Triton lazily, so ``import lorambo_kernels`` works without it; a
kernel's name without Triton is an ImportError giving the ``pip install`` command.
"""

__version__ = "0.1.0"

_LAZY = {
    "lora_linear_forward": "lora_linear",
    "lora_linear_backward": "lora_linear",
    "lora_gemm": "fused_gemm",
    "lora_down": "lora_skinny",
    "lora_wgrad": "lora_skinny",
    "dropout_keep_mask": "dropout",
    "SketchGroup": "sketch",
    "gram_sq_norms": "sketch",
    "row_dots": "sketch",
    "gaussian_probe": "sketch",
    "rank_bucket": "config",
    "RANK_BUCKETS": "config",
    "SUPPORTED_DTYPES": "config",
}

__all__ = ["triton_available", *_LAZY]


def triton_available() -> bool:
    """Whether Triton can be imported (it may be absent on CPU-only installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def __getattr__(name):
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(f"lorambo_kernels.{_LAZY[name]}")
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] != "triton":  # something else is missing: as it is
                raise
            from lorambo_kernels.config import MIN_TRITON

            need = ".".join(map(str, MIN_TRITON))
            raise ImportError(f"lorambo_kernels.{name} needs triton, which is not installed: "
                              f"pip install 'triton>={need}'") from error
        return getattr(module, name)
    raise AttributeError(f"module 'lorambo_kernels' has no attribute {name!r}")

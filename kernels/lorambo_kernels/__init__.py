"""lorambo_kernels: Triton kernels for lorambo (imports triton and torch only, never lorambo).

Installed from kernels/lorambo_kernels as its own top-level package; kernels/ itself has no
__init__.py so that nothing becomes importable as ``kernels`` (transformers probes that name).
The fused LoRA forward/backward kernels land here with the Triton issue.
"""

__version__ = "0.1.0"


def triton_available() -> bool:
    """Whether Triton can be imported (it may be absent on CPU-only installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

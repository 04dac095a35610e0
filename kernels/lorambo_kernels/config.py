"""Launch configuration for the LoRA kernels: rank buckets, block shapes, split factors, TMA switch.

Everything here is a pure function of shapes, dtype and device, so a launch never benchmarks,
never synchronises and is CUDA-graph friendly (``triton.autotune`` would time configs on the
first call, which breaks graph capture and torch.compile's first run).

Measurement status: the GPU block shapes below are NOT measured on this code yet (it was written
without a GPU). They are the configurations the Triton matmul tutorials (03 and 09) ship for
Ampere/Hopper, and the calibration probe in docs/performance.md (H100, triton 3.6, bf16: pointer loads 73 % of
cuBLAS, host TMA descriptors + persistent grid 90-100 %) decides which path is the default on
sm_90. Whoever first runs ``benchmarks/bench_lora_linear.py`` on a GPU should replace each
"UNMEASURED" note with the measurement that picked the value.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

# Rank buckets: BLOCK_R is the smallest bucket >= r (tl.dot needs >= 16). Ranks above the last
# bucket loop over chunks of 128 with the rank as the loop bound, so growing a layer from rank 1
# to any capacity compiles at most len(RANK_BUCKETS) variants of each kernel.
RANK_BUCKETS = (16, 32, 64, 128)
MAX_BLOCK_R = RANK_BUCKETS[-1]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rank_bucket(rank: int) -> int:
    """BLOCK_R for an active rank: 16, 32, 64 or 128 (ranks > 128 are looped in chunks of 128)."""
    for bucket in RANK_BUCKETS:
        if rank <= bucket:
            return bucket
    return MAX_BLOCK_R


# Ahead-of-time planning (tools/aot_sm90.py, a development tool outside the package): inside
# ``plan_for_gpu`` the functions below answer for that GPU (SM count, capability, never the
# interpreter) without asking CUDA, so the launchers can be run on meta tensors to list the
# kernels they would compile there. None: ask as usual.
_planned_gpu: contextvars.ContextVar[tuple[int, tuple[int, int]] | None] = contextvars.ContextVar(
    "lorambo_planned_gpu", default=None)


@contextlib.contextmanager
def plan_for_gpu(sm_count: int, capability: tuple[int, int]):
    """Configs for a CUDA GPU with ``sm_count`` SMs and compute ``capability`` (e.g. H100: 132,
    (9, 0)) within this block, whatever the tensors' device and TRITON_INTERPRET say."""
    token = _planned_gpu.set((int(sm_count), tuple(capability)))
    try:
        yield
    finally:
        _planned_gpu.reset(token)


# The values triton's getenv_bool takes as true (triton 3.6; tests/kernels/test_interpret_setting.py
# compares with the installed triton). Read as "1" only, TRITON_INTERPRET=true ran triton's
# interpreter while lorambo refused CPU tensors, telling the user to set what they had set. Pure
# Python, not triton.knobs: Dynamo cannot trace triton's C getenv inside a compiled launch.
_TRUE = ("1", "true", "on", "yes", "y")


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def is_interpreter() -> bool:
    """Kernels run under ``TRITON_INTERPRET=1`` (numpy on CPU tensors)."""
    if _planned_gpu.get() is not None:
        return False
    return _interpret_requested()


# The oldest triton the kernels are tested with (the ``triton`` extra in pyproject.toml says the
# same; tests/kernels/test_triton_version.py compares them). Older releases differ where the kernels
# depend on them: triton 3.0 reads TRITON_INTERPRET as "1" only, so TRITON_INTERPRET=true (which
# lorambo, like triton >= 3.6, takes) launched compiled kernels on CPU tensors and failed with
# "0 active drivers"; on a GPU nothing older than 3.6 has run them.
MIN_TRITON = (3, 6)


def unavailable_reason(device_type: str) -> str | None:
    """None when the Triton kernels can run on ``device_type``, else why not (for errors)."""
    try:
        import triton
    except ImportError:
        return "triton is not installed (pip install triton)"
    if _version(triton.__version__) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return (f"triton {triton.__version__} is older than {need}, the oldest lorambo's kernels support "
                f"(pip install 'triton>={need}')")
    if device_type == "cuda":
        return None
    if _interpret_requested() and device_type == "cpu":
        return interpreter_incompatibility()
    return (f"the Triton kernels need a CUDA device (or CPU tensors under TRITON_INTERPRET=1), "
            f"got device type {device_type!r}")


def interpreter_incompatibility() -> str | None:
    """Why this triton's interpreter cannot run the kernels with this numpy, or None.

    The kernels loop to bounds loaded from per-layer tables; triton 3.6's interpreter turns such a
    scalar into a Python int with ``int(ndarray)``, which numpy >= 2.4 rejects for its 1-element
    arrays (triton 3.7 squeezes first). Measured with triton 3.6.0: numpy 2.3.5 runs the suite,
    numpy 2.4.6 fails every kernel test with an InterpreterError. Compiled kernels are unaffected.
    """
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run lorambo's "
                f"kernels with numpy {numpy.__version__}: it converts loaded scalars with int(), which "
                f"numpy >= 2.4 rejects; use triton >= 3.7 or numpy < 2.4 (compiled kernels on a GPU "
                f"are unaffected)")
    return None


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision.

    fp16/bf16 always run on tensor cores with fp32 accumulation. fp32 follows PyTorch's own
    switch: ``torch.backends.cuda.matmul.allow_tf32`` (False by default, i.e. full IEEE fp32 like
    cuBLAS); when a user enables TF32 for torch matmuls, the kernels use TF32 too and the fp32
    error is then ~1e-3 relative, like torch's. The interpreter always computes in IEEE fp32,
    and multiplies bf16 tiles after widening them to fp32 ("upcast", see common.mma).
    """
    if is_interpreter():
        return "upcast" if dtype == torch.bfloat16 else "ieee"
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (4 under the interpreter: small persistent grids)."""
    if _planned_gpu.get() is not None:
        return _planned_gpu.get()[0]
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple[int, int]:
    if _planned_gpu.get() is not None:
        return _planned_gpu.get()[1]
    if device.type != "cuda":
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------------ GEMM
def gemm_config(M: int, N: int, K: int, block_r: int, dtype: torch.dtype, device: torch.device,
                lora_acc: bool = False) -> dict:
    """Block shapes for the fused GEMM ``out[M, N] = a[M, K] b[K, N] (+ LoRA epilogue)``.

    Keyed on the bucket of M (<= 64, <= 256, larger) and on the rank bucket (the fused
    down-projection keeps a [BLOCK_M, BLOCK_R] fp32 accumulator next to the main one).
    ``lora_acc``: the LoRA product has its own [BLOCK_M, BLOCK_N] accumulator (dropout, or a
    scaling too extreme to fold).
    """
    if is_interpreter():
        # Small tiles so tiny test shapes still span several programs, K-steps and partial
        # blocks; GROUP_M=2 exercises the grouped tile order.
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1)
    big = dtype != torch.float32
    if M <= 64:
        # UNMEASURED. Decode-like M: few row tiles, so narrow N tiles to fill the SMs.
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128 if big else 64, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 256:
        # UNMEASURED (triton tutorial 03 config).
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 if big else 32, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        # UNMEASURED (triton tutorial 03/09 Hopper config: 128x128x64, 8 warps, 3-4 stages).
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if big else 32, GROUP_M=8, num_warps=8,
                   num_stages=4 if big else 3)
    if block_r >= 128 and cfg["BLOCK_M"] == 128:
        cfg["num_stages"] = 3  # the [128, 128] fp32 down-projection accumulator costs registers
    if lora_acc and cfg["BLOCK_N"] > 64:
        # A second [BLOCK_M, 128] fp32 accumulator: 16 of 28 half-precision variants at rank 16
        # spilled up to 344 bytes per thread, up to 2.1 KB at rank 128 (sm_90 AOT compile of all
        # configurations, triton 3.6.0); the 64-wide tiles of the same kernel spilled none at
        # ranks <= 64 (docs/gpu_check.md).
        cfg["BLOCK_N"] = 64
    if block_r >= 128 and M <= 64:
        # the [128, 128] lora_A tile per stage: 4 stages need 256 KiB (sm_90 AOT compile), over the
        # H100's 227 KiB and the A100's 163 KiB; 2 stages fit both
        cfg["num_stages"] = 2
    if block_r >= 128 and not big:
        # fp32 operands with the rank-128 tiles of lora_A / lora_B: 3-4 stages need 256-384 KiB of
        # shared memory (measured by the sm_90 AOT compile, tests/kernels/test_aot_sm90.py), over
        # the H100's 227 KiB per block; at 128-row tiles 2 stages still need 256 KiB, 64-wide N fits
        cfg["num_stages"] = 2
        if cfg["BLOCK_M"] == 128:
            cfg["BLOCK_N"] = 64
    return cfg


def tma_gemm_config(M: int, N: int, K: int, block_r: int, dtype: torch.dtype, device: torch.device,
                    lora_acc: bool = False) -> dict:
    """Block shapes for the persistent TMA GEMM (Hopper). ``lora_acc``: the LoRA product has its
    own [BLOCK_M, BLOCK_N] accumulator (dropout, or a scaling too extreme to fold)."""
    if is_interpreter():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1)
    big = dtype != torch.float32
    # UNMEASURED (triton tutorial 09 persistent-matmul config, which the probe in docs/performance.md used
    # to reach 90-100 % of cuBLAS at M=8192 on H100).
    cfg = dict(BLOCK_M=128, BLOCK_N=256 if big and M > 256 else 128, BLOCK_K=64 if big else 32,
               GROUP_M=8, num_warps=8, num_stages=3)
    if block_r >= 64 and cfg["BLOCK_N"] == 256:
        cfg["BLOCK_N"] = 128  # keep the fused [128, BLOCK_R] accumulator in registers
    if lora_acc and cfg["BLOCK_N"] == 256:
        # Two [128, 256] fp32 accumulators are 256 registers per thread at 8 warps, over the 255
        # limit: every such variant spilled 1.0-1.7 KB of stack per thread (sm_90 AOT compile of
        # all configurations with triton 3.6.0; 4-5 KB with 3.9.0). At 128 wide: none at ranks
        # <= 32, at most 112 bytes at 64-128 (tools/aot_sm90.py --configs; docs/gpu_check.md).
        cfg["BLOCK_N"] = 128
    if block_r >= 128 and not big:
        cfg["num_stages"] = 2  # fp32 at 3 stages: 256 KiB of shared memory (sm_90 AOT compile)
    return cfg


# ---------------------------------------------------------------------- skinny kernels
def down_config(M: int, K: int, block_r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """``out[M, r] = drop(a)[M, K] b[K, r]``: bandwidth bound (reads a once)."""
    if is_interpreter():
        return dict(BLOCK_M=16, BLOCK_K=16, num_warps=1, num_stages=1)
    # UNMEASURED. 64-row tiles give M/64 programs (128 at M=8192, about one per H100 SM); the
    # wide K tile keeps enough bytes in flight per program for a bandwidth-bound loop.
    return dict(BLOCK_M=64 if M > 2048 else 32, BLOCK_K=128 if dtype != torch.float32 else 64,
                num_warps=4, num_stages=4)


def wgrad_config(P: int, M: int, block_r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """``out[P, r] = s drop(a)^T[P, M] u[M, r]``: reduction over the long M axis, split in
    SPLIT_M deterministic fp32 partials so that P/BLOCK_P * SPLIT_M fills the GPU."""
    if is_interpreter():
        return dict(BLOCK_P=16, BLOCK_M=16, SPLIT_M=2 if M > 16 else 1, num_warps=1, num_stages=1)
    block_p = 64
    tiles = -(-P // block_p)
    # UNMEASURED. Aim at ~2 programs per SM, but keep >= 256 rows of M per split so the
    # fp32 partials ([SPLIT_M, P, r], summed afterwards) stay small next to a.
    want = max(1, (2 * sm_count(device)) // max(tiles, 1))
    split = max(1, min(want, M // 256, 32))
    return dict(BLOCK_P=block_p, BLOCK_M=64 if dtype != torch.float32 else 32, SPLIT_M=split,
                num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------- TMA switch
def tma_available() -> bool:
    """Host TMA descriptors importable (triton >= 3.4)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def want_tma(device: torch.device) -> bool:
    """Use the persistent TMA GEMM? ``LORAMBO_TMA=0|1`` forces it off/on (on also under the
    interpreter, which is how CI exercises that kernel); default: on for sm_90+ with Triton
    descriptors, off elsewhere (sm_80 and older have no TMA; the pointer path runs there).
    ``auto`` (or unset) is that default; any other value is a ValueError."""
    env = os.environ.get("LORAMBO_TMA", "auto").strip().lower()
    if env not in ("0", "off", "false", "1", "on", "true", "auto"):
        raise ValueError(f"lorambo_kernels: LORAMBO_TMA={os.environ['LORAMBO_TMA']!r} is not one of "
                         "0|off|false, 1|on|true or auto")
    if env in ("0", "off", "false"):
        return False
    if not tma_available():
        return False
    if env in ("1", "on", "true"):
        return True
    if is_interpreter():
        return False
    return capability(device)[0] >= 9  # (0, 0) off CUDA

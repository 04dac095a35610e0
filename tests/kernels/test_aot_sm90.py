"""The kernels compile for an H100 (sm_90) on a machine without a GPU.

On CPU the suite runs the kernels only in Triton's interpreter, which enforces none of the GPU
compile rules (tl.dot shapes, layouts, shared memory, TMA descriptors). Here every kernel the
launchers launch is compiled ahead of time for sm_90 by Triton's own toolchain (ptxas ships
with triton; no device needed): tools/aot_sm90.py runs the launchers on meta tensors over a
shape sweep and binds each launch the way JITFunction.run does.

The sweep has ~1200 launcher configurations (~4 s of compiling each), too many for the suite, so
this test compiles a covering subset (aot.representative: every kernel x dtype x block-shape
configuration, rank bucket, flag combination, TMA operand layout and argument types). The full
checks: ``python tools/aot_sm90.py --configs`` (every configuration) and
``python tools/aot_sm90.py`` (every value-specialized variant), with ``-j N`` on a big box.

The compiling runs in worker processes without TRITON_INTERPRET, one per core (at most 4); the
first run takes a few minutes, later ones hit Triton's cache (~/.triton/cache).
"""

import dataclasses
import os

import pytest

pytest.importorskip("triton")

import aot_sm90 as aot  # noqa: E402  (tools/, put on sys.path by conftest.py)
from lorambo_kernels import config  # noqa: E402

TARGET = aot.H100
H100_SHARED = 232448  # bytes per block (opt-in maximum)
CONFIGS = aot.collect(TARGET, "configs", distinct_configs=True)
CASES = aot.representative(CONFIGS)


@pytest.fixture(scope="module")
def compiled(request):
    """Results of the cases this session selected, compiled in one go."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    # one worker per core: the compiling is ~3 minutes of CPU, most of this suite's wall time on 2 cores
    results = aot.compile_all(selected or CASES, TARGET, jobs=max(1, min(4, len(os.sched_getaffinity(0)))))
    return {r.case: r for r in results}


@pytest.mark.parametrize("case", CASES, ids=[c.test_id() for c in CASES])
def test_kernel_compiles_for_sm90(case, compiled):
    res = compiled[case]
    assert res.ok, f"does not compile for sm_90 (first launched by {case.example}):\n{res.error}"
    if res.shared is not None:
        assert res.shared <= H100_SHARED, (
            f"needs {res.shared} B of shared memory per block, the H100 has {H100_SHARED} "
            f"(first launched by {case.example})")


SEPARATE_LORA_ACC_TMA = [c for c in CASES if c.kernel.endswith("_lora_gemm_tma_kernel") and "LORA_ACC=T" in c.label()
                         and not c.label().startswith("_lora_gemm_tma_kernel[fp32")]


@pytest.mark.parametrize("case", SEPARATE_LORA_ACC_TMA, ids=[c.test_id() for c in SEPARATE_LORA_ACC_TMA])
def test_tma_gemm_with_a_separate_lora_accumulator_does_not_spill_a_kilobyte(case, compiled):
    # Dropout training steps take this variant. With 256-wide tiles its two [128, 256] fp32
    # accumulators need 256 registers per thread, and every such variant spilled 1.0-1.7 KB of
    # stack (triton 3.6) or 4-5 KB (3.9); config.tma_gemm_config keeps it at 128 wide.
    res = compiled[case]
    assert res.ok and res.stack is not None and res.stack < 1024, (
        f"{case.label()} keeps {res.stack} bytes of stack per thread (first launched by {case.example})")


SEPARATE_LORA_ACC_POINTER = [c for c in CASES if c.kernel.endswith(":_lora_gemm_kernel") and "LORA_ACC=T" in c.label()
                             and "fp32" not in c.label().split(",")[0]]


@pytest.mark.parametrize("case", SEPARATE_LORA_ACC_POINTER, ids=[c.test_id() for c in SEPARATE_LORA_ACC_POINTER])
def test_pointer_gemm_with_a_separate_lora_accumulator_does_not_spill(case, compiled):
    # At 128-wide tiles this variant spilled 0.3-2.1 KB per thread (triton 3.6); at the 64-wide
    # tiles config.gemm_config now gives it, none up to rank 64 and < 200 bytes at rank 128.
    res = compiled[case]
    limit = 0 if dict(case.constexprs)["BLOCK_R"] <= 64 else 256
    assert res.ok and res.stack is not None and res.stack <= limit, (
        f"{case.label()} keeps {res.stack} bytes of stack per thread (first launched by {case.example})")


def test_every_kernel_is_launched_by_the_sweep():
    assert aot.uncovered_kernels(CONFIGS) == []
    assert {c.kernel for c in CASES} == {c.kernel for c in CONFIGS}
    assert len(CASES) < len(CONFIGS) / 5  # the subset stays small enough for the suite


def test_a_gpu_compile_error_is_reported():
    # tl.dot needs K >= 16 on the GPU: a down-projection with BLOCK_K = 8 must fail, with the rule.
    down = next(c for c in CONFIGS if c.name == "_lora_down_kernel")
    bad = dataclasses.replace(down, constexprs=tuple((k, 8 if k == "BLOCK_K" else v) for k, v in down.constexprs))
    (res,) = aot.compile_all([bad], TARGET)
    assert not res.ok and "K >= 16" in res.error, res.error


def test_plan_for_gpu_is_scoped():
    import torch

    cpu = torch.device("cpu")
    before = (config.is_interpreter(), config.sm_count(cpu), config.capability(cpu))
    with config.plan_for_gpu(132, (9, 0)):
        assert (config.is_interpreter(), config.sm_count(cpu), config.capability(cpu)) == (False, 132, (9, 0))
    assert (config.is_interpreter(), config.sm_count(cpu), config.capability(cpu)) == before

"""``@triton.jit`` helpers shared by the kernel families."""

# (no `from __future__ import annotations`: kernels keep real tl.constexpr annotations)

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` (fp32 accumulator).

    PRECISION is a ``tl.dot`` input precision ("ieee", "tf32") or "upcast": the Triton
    interpreter multiplies bf16 tiles as raw 16-bit integers (numpy has no bfloat16; triton 3.9),
    so under the interpreter bf16 tiles are widened to fp32 first. bf16 products are exact in
    fp32, so this equals a bf16 tensor-core MMA with fp32 accumulation.
    """
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def downcast(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 ``x`` -> ``dtype`` rounded to nearest even, as on the GPU.

    The Triton interpreter (3.9) truncates fp32 -> bf16 conversions, which would add up to one
    bf16 ulp of error that GPUs don't have; under the interpreter ("upcast") bf16 is rounded
    here by integer arithmetic on the fp32 bits first, so the truncating cast is exact.
    """
    if PRECISION == "upcast" and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = ((bits >> 16) << 16).to(tl.float32, bitcast=True).to(dtype)
    else:
        out = x.to(dtype)
    return out

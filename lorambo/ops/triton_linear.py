"""The LoRA linear op on the fused Triton kernels (``lorambo_kernels``), as torch.library ops.

    y = x W^T + b + s * (drop(x) A_r^T) B_r^T      same semantics as lora_linear_reference

The custom ops ``torch.ops.lorambo_triton.{lora_linear_fwd, lora_linear_bwd, dropout_multiplier}``
(``lorambo::`` belongs to the compiled extension) are built by :mod:`lorambo.ops.custom_op`: fake
implementations so torch.compile traces a model of LoRAMBoLinear layers with fullgraph=True, the
seed as a 0-d CPU tensor, a symbolic rank, the mask regenerated in the backward from the seed
(philox counters, never stored), and exact double backward through differentiable torch ops (at
reference-op speed; plain backward always runs the kernels). Nothing reads a device value on
the host (rank, scaling, p are Python scalars, seed a CPU scalar), so the op is CUDA-graph
capturable; a captured graph replays the seed it was captured with, i.e. the same dropout mask.

Dropout: the kernels draw their own mask (``lorambo_kernels.dropout_keep_mask``); it is not the
torch-generator mask of the reference op, so the two backends agree exactly only at p = 0.
"""

from lorambo_kernels.config import SUPPORTED_DTYPES, unavailable_reason  # torch only: no triton import

from lorambo.ops.custom_op import define_lora_op
from lorambo.ops.op_operands import check_devices, check_dtypes, check_scalars, check_shapes, check_tensors
from lorambo.ops.output_rows import rows_to_output
from lorambo.ops.seed_argument import check_seed


def _kernels():
    import lorambo_kernels.lora_linear as kernels  # imported lazily: triton is optional

    return kernels


# ------------------------------------------------------------------------------ validation
def _check_inputs(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed, device_checked=False) -> None:
    """Raise a TypeError/ValueError naming the bad value; runs before any kernel launch.

    ``device_checked``: the backend resolution already verified that Triton runs on x's device
    (so the traced forward reads no environment variable)."""
    check_tensors("lora_linear_triton", x, weight, bias, lora_A, lora_B)
    check_dtypes("lora_linear_triton", x, weight, bias, lora_A, lora_B)
    _check_dtype("lora_linear_triton", x)
    check_devices("lora_linear_triton", x, weight, bias, lora_A, lora_B)
    reason = None if device_checked else unavailable_reason(x.device.type)
    if reason is not None:
        raise RuntimeError(f"lora_linear_triton: {reason}")
    check_shapes("lora_linear_triton", x, weight, bias, lora_A, lora_B)
    check_scalars("lora_linear_triton", rank, lora_A.shape[0], scaling, dropout_p)
    if dropout_p > 0.0:
        check_seed("lora_linear_triton", seed)


def _check_dtype(op: str, x) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: dtype {x.dtype} is not supported by the Triton kernels "
                        f"(float16, bfloat16, float32); use the 'torch' backend")


def _check_backend(op: str, x) -> None:
    """The dtype, and the device where it is no CUDA device (a direct call of the ops on CPU
    tensors without TRITON_INTERPRET=1); on CUDA a missing triton fails at the kernels' import."""
    _check_dtype(op, x)
    if x.device.type != "cuda":
        reason = unavailable_reason(x.device.type)
        if reason is not None:
            raise RuntimeError(f"{op}: {reason}")


# ---------------------------------------------------------------------------- custom ops
def _forward(x, weight, bias, lora_A, lora_B, rank, scaling, p, seed):
    return _kernels().lora_linear_forward(x, weight, bias, lora_A, lora_B, rank, scaling, p, seed)


def _backward(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, p, seed, needs):
    return _kernels().lora_linear_backward(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, p, seed, needs)


def _multiplier(x, p, seed):
    from lorambo_kernels import dropout_keep_mask

    return dropout_keep_mask(seed, x.shape[0], x.shape[1], p, x.device).to(x.dtype) / (1.0 - p)


_apply = define_lora_op("lorambo_triton", _forward, _backward, _multiplier, check_backend=_check_backend)


# -------------------------------------------------------------------------------- public
def lora_linear_triton(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p=0.0, seed=None, *,
                       device_checked=False):
    """LoRA linear on inputs of shape [..., K] with the fused Triton kernels.

    weight [N, K], bias [N] or None, lora_A [cap, K], lora_B [N, cap], 0 <= rank <= cap.
    ``dropout_p > 0`` needs a ``seed``: an int, or a 0-d int64 CPU tensor (what torch.compile
    can carry as a graph value); same seed, same mask. Inputs are checked
    (dtype, device, shapes, rank) before anything is launched; ``rank`` may be a symbolic int
    under torch.compile.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed, device_checked)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K)
    p = float(dropout_p)
    y = _apply(x2, weight, bias, lora_A, lora_B, rank, float(scaling), p, seed if p > 0.0 else 0)
    return rows_to_output(y, lead)

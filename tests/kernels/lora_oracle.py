"""Float64 oracle and tolerance rule shared by the kernel tests (imported as a plain module)."""

import torch

from lorambo.ops.triton_linear import lora_linear_triton


def make_inputs(m, k, n, cap, *, bias=True, dtype=torch.float32, device="cpu", lead=None, w_grad=False,
                gen=None):
    """Fresh random inputs (never zeros): x [*lead or m, k], W [n, k], b [n], A [cap, k], B [n, cap].

    The pools are fully random, inactive slots included, so a kernel that read a slot >= r
    would be caught by the comparison."""
    shape = (*lead, k) if lead is not None else (m, k)

    def rnd(*s, grad=True):
        return (torch.randn(*s, dtype=torch.float64, generator=gen) / (s[-1] ** 0.25)).to(
            device=device, dtype=dtype).requires_grad_(grad)

    return dict(x=rnd(*shape), weight=rnd(n, k, grad=w_grad), bias=rnd(n) if bias else None,
                lora_A=rnd(cap, k), lora_B=rnd(n, cap))


def oracle(x, weight, bias, lora_A, lora_B, rank, scaling, mask=None):
    """Plain autograd formula in float64; ``mask``: the dropout multiplier [..., K] or None."""
    xd = x if mask is None else x * mask
    y = x @ weight.t() + (0 if bias is None else bias)
    return y + scaling * (xd @ lora_A[:rank].t()) @ lora_B[:, :rank].t()


def grads_of(fn, inputs, names, grad_y):
    """(y, {name: grad}) of fn(**inputs) for the named inputs that require grad."""
    y = fn(**inputs)
    wrt = [n for n in names if inputs.get(n) is not None and inputs[n].requires_grad]
    got = torch.autograd.grad(y, [inputs[n] for n in wrt], grad_y)
    return y, dict(zip(wrt, got))


def multiplier_for(seed, m, k, p, device):
    """The kernels' dropout multiplier (0 or 1/(1-p)) for an [m, k] input, in float64."""
    from lorambo_kernels import dropout_keep_mask

    return dropout_keep_mask(seed, m, k, p, device).double() / (1.0 - p)


def double(inputs):
    return {n: (None if t is None else t.detach().double().requires_grad_(t.requires_grad))
            for n, t in inputs.items()}


def run_all(inputs, rank, scaling, dropout_p=0.0, seed=None, mask=None, grad_y=None):
    """Kernel and float64 oracle outputs and gradients: (y, grads, y64, grads64, grad_y)."""
    names = ["x", "weight", "bias", "lora_A", "lora_B"]
    y = lora_linear_triton(**inputs, rank=rank, scaling=scaling, dropout_p=dropout_p, seed=seed)
    if grad_y is None:
        grad_y = torch.randn(y.shape, dtype=torch.float64).to(y)
    _, grads = grads_of(lambda **kw: lora_linear_triton(**kw, rank=rank, scaling=scaling,
                                                        dropout_p=dropout_p, seed=seed),
                        inputs, names, grad_y)
    in64 = double(inputs)
    y64, grads64 = grads_of(lambda **kw: oracle(**kw, rank=rank, scaling=scaling, mask=mask),
                            in64, names, grad_y.double())
    return y, grads, y64, grads64


def assert_close64(got, want, rtol=2e-5, what=""):
    """fp32 kernel vs float64 oracle: error relative to the tensor's scale."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"  # no broadcasting
    scale = want.abs().max().item() + 1e-30
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.0e} * scale {scale:.3e}"


def assert_tolerance_rule(got, torch_same_dtype, want, what=""):
    """docs/performance.md rule: error vs float64 <= 2x PyTorch's own error in the same dtype (plus a
    floor of 1e-6 of the scale for the case where PyTorch happens to be exact)."""
    assert got.shape == torch_same_dtype.shape == want.shape, f"{what}: shapes differ"  # no broadcasting
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    ref_err = (torch_same_dtype.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * scale, f"{what}: error {err:.3e} > 2 x torch's {ref_err:.3e}"

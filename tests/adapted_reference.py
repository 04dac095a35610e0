"""The float64 reference of an adapted model: a float64 copy of its plain base run through
``torch.func.functional_call`` with each adapter's active delta ``s B_r A_r`` added to the weight
it adapts, in plain torch (no lorambo op), differentiable in every pool."""

import torch
from torch.func import functional_call

from lorambo import lora_layers


def run_reference(base64, adapted, args=(), kwargs=None):
    """``(output of base64 with the adapters of adapted merged in, {layer name: (A, B)})``: the
    float64 leaves ``A`` and ``B`` take the reference's gradients. ``base64`` is the model before
    ``configure_model``, in float64 and in the adapted model's mode (dropout off)."""
    params, leaves = {}, {}
    for name, layer in lora_layers(adapted).items():
        r = layer.rank
        a = layer.lora_A.detach().double().requires_grad_()
        b = layer.lora_B.detach().double().requires_grad_()
        delta = layer.scaling * b[:, :r] @ a[:r]  # [out, in]
        weight = base64.get_submodule(name).weight.detach()
        params[f"{name}.weight"] = weight + (delta if layer.base_kind == "linear" else delta.T)  # Conv1D: [in, out]
        leaves[name] = (a, b)
    return functional_call(base64, params, args, kwargs or {}), leaves


def assert_pool_grads_match(adapted, leaves, rtol):
    """Every pool gradient of ``adapted`` equals its reference leaf's, elementwise to ``rtol`` of
    the element and of the leaf's largest element; a reference gradient of zero fails (the loss
    would not see that pool)."""
    for name, layer in lora_layers(adapted).items():
        for pool, leaf in zip((layer.lora_A, layer.lora_B), leaves[name]):
            scale = float(leaf.grad.abs().max())
            assert pool.grad is not None and scale > 0, name
            torch.testing.assert_close(pool.grad.double(), leaf.grad, rtol=rtol, atol=rtol * scale, msg=name)

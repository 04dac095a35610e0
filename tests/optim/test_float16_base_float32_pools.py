"""The recipe docs/adamw.md gives for a float16 (or bfloat16) base: float32 pools, the forward under
autocast to the base's dtype and a GradScaler (which refuses float16 gradients, so float16 pools
cannot use it). The pools get float32 gradients and lorambo.optim.AdamW steps them as float64
AdamW does on those gradients unscaled."""

import pytest
import torch

import lorambo
from lorambo import configure_model

UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    configure_model(model, 2, capacity=4, target_modules=["0", "2"])
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B[:, :2].normal_(std=0.1)
    model.to(dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_pools_on_a_low_precision_base_train_under_autocast_with_a_grad_scaler(dtype):
    model = _model(dtype)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 12, generator=gen), torch.randn(8, 5, generator=gen)
    pools = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in pools} == {torch.float32}
    ref = [p.detach().double().clone().requires_grad_() for p in pools]
    opt = lorambo.optim.AdamW(pools, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)

    def float64_loss(params):  # the same model in float64, base weights as stored
        h = x.to(dtype).double()  # the input as the model gets it
        for k, i in enumerate((0, 2)):
            layer = model[i]
            a, b = params[2 * k], params[2 * k + 1]
            h = (h @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
                 + layer.scaling * (h @ a[:2].T) @ b[:, :2].T)
            h = torch.tanh(h) if i == 0 else h
        return (h - y.double()).square().mean()

    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):
            out = model(x.to(dtype))
        loss = (out.float() - y).square().mean()
        scaler.scale(loss).backward()
        exact = [p.detach().double().requires_grad_() for p in pools]
        float64_loss(exact).backward()
        scale = scaler.get_scale()
        for p, e, r in zip(pools, exact, ref):
            assert p.grad.dtype == torch.float32
            # forward and backward in the base's dtype: a few of its roundings per element
            err = float((p.grad.double() / scale - e.grad).abs().max())
            assert err <= 16 * UNIT_ROUNDOFF[dtype] * float(e.grad.abs().max()), err
            r.grad = p.grad.double() / scale  # the reference steps on the same gradients, unscaled
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        ref_opt.step()
        for p, r in zip(pools, ref):
            torch.testing.assert_close(p.detach().double(), r.detach(), rtol=1e-6, atol=1e-7)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in pools)

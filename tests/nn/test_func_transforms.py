"""torch.func transforms over a configured model: per-sample gradients (vmap of grad over
functional_call), jvp and jacrev, as they work through nn.Linear / Conv1D. The backends' ops are
autograd Functions that functorch refused ("must override the setup_context staticmethod",
"cannot use C++ torch::autograd::Function with functorch transforms")."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from lorambo import configure_model, lora_layers


def _model(make_base):
    torch.manual_seed(0)
    model = configure_model(nn.Sequential(make_base(7, 6), make_base(6, 5)).double(), 2, capacity=4, alpha=6.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
    return model.eval()


def _linear(in_f, out_f):
    return nn.Linear(in_f, out_f)


def _conv1d(in_f, out_f):
    return Conv1D(out_f, in_f)  # Conv1D(nf=out, nx=in), weight [in, out]


def _dense(layer):
    """(M, b): the layer's whole map W + s B_r A_r as a float64 [out, in] matrix, and its bias."""
    r = layer.rank
    w = layer.base_layer.weight.detach().double()
    w = w if isinstance(layer.base_layer, nn.Linear) else w.t()
    lora = layer.lora_B[:, :r].detach().double() @ layer.lora_A[:r].detach().double()
    return w + layer.scaling * lora, layer.base_layer.bias.detach().double()


def _pool_grads(layer, u, g):
    """Float64 gradients of lora_A / lora_B for one sample: input u [in], output gradient g [out]."""
    r, s = layer.rank, layer.scaling
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
    grad_a[:r] = s * torch.outer(b[:, :r].t() @ g, u)
    grad_b[:, :r] = s * torch.outer(g, a[:r] @ u)
    return grad_a, grad_b


@pytest.mark.parametrize("make_base", [_linear, _conv1d])
def test_per_sample_gradients_by_vmap_of_grad_match_float64_math(make_base, backend):
    model = _model(make_base)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(3, 7, dtype=torch.float64)

    def loss(p, xi):
        return 0.5 * torch.func.functional_call(model, p, (xi,)).square().sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    (m1, b1), (m2, b2) = (_dense(model[0]), _dense(model[1]))
    for i in range(3):
        h = m1 @ x[i] + b1
        y = m2 @ h + b2
        for name, u, g in (("0", x[i], m2.t() @ y), ("1", h, y)):
            want_a, want_b = _pool_grads(model.get_submodule(name), u, g)
            torch.testing.assert_close(grads[f"{name}.lora_A"][i], want_a, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grads[f"{name}.lora_B"][i], want_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make_base", [_linear, _conv1d])
def test_jacrev_and_jvp_of_the_model_match_its_float64_matrix(make_base, backend):
    model = _model(make_base)
    (m1, _), (m2, _) = (_dense(model[0]), _dense(model[1]))
    x, v = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(torch.func.jacrev(model)(x), m2 @ m1, rtol=1e-10, atol=1e-12)
    out, tangent = torch.func.jvp(model, (x,), (v,))
    torch.testing.assert_close(tangent, m2 @ m1 @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make_base", [_linear, _conv1d])
def test_forward_mode_ad_dual_tensors_match_the_float64_matrix(make_base, backend):
    """torch.autograd.forward_ad (nn.Linear supports it) used to fail in every backend's op:
    "You must implement the jvp function" (autograd.Function), "jvp is not implemented for the
    c++ API" (extension), naming no layer."""
    model = _model(make_base)
    (m1, _), (m2, _) = (_dense(model[0]), _dense(model[1]))
    x, v = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    layer = model[1]
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangent_a = torch.randn_like(layer.lora_A)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(model(fwAD.make_dual(x, v)))
        params["1.lora_A"] = fwAD.make_dual(params["1.lora_A"], tangent_a)
        by_a = fwAD.unpack_dual(torch.func.functional_call(model, params, (x,))).tangent
    torch.testing.assert_close(out.primal, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangent, v @ (m2 @ m1).t(), rtol=1e-10, atol=1e-12)
    h = x @ m1.t() + model[0].base_layer.bias.detach()
    r = layer.rank  # inactive slots of the tangent do not reach the output
    want = layer.scaling * (h @ tangent_a[:r].t()) @ layer.lora_B[:, :r].detach().t()
    torch.testing.assert_close(by_a, want, rtol=1e-10, atol=1e-12)


def test_grad_with_lora_dropout_matches_float64_math_with_torchs_dropout_mask():
    """Inside a transform the LoRA dropout is F.dropout, drawn from torch's generator as
    nn.Dropout's is: re-seeding reproduces its masks for the float64 reference."""
    model = configure_model(nn.Sequential(nn.Linear(7, 6), nn.Linear(6, 5)).double(), 2, capacity=4, dropout=0.5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.manual_seed(3)
    grads = torch.func.grad(lambda p: 0.5 * torch.func.functional_call(model, p, (x,)).square().sum())(params)
    torch.manual_seed(3)
    masks = [F.dropout(torch.ones(4, n, dtype=torch.float64), 0.5) for n in (7, 6)]
    assert 0 < int((masks[0] == 0).sum()) < 28  # dropout really drops, and not everything

    (w1, a1, b1), (w2, a2, b2) = ((m.base_layer.weight.detach(), m.lora_A[:2].detach(), m.lora_B[:, :2].detach())
                                  for m in model)
    s1, s2 = model[0].scaling, model[1].scaling
    # y = u W^T + b + s ((u * mask) A_r^T) B_r^T per layer; loss = |y|^2 / 2, so dL/dy = y
    h = x @ w1.t() + model[0].base_layer.bias.detach() + s1 * ((x * masks[0]) @ a1.t()) @ b1.t()
    y = h @ w2.t() + model[1].base_layer.bias.detach() + s2 * ((h * masks[1]) @ a2.t()) @ b2.t()
    dh = y @ w2 + s2 * ((y @ b2) @ a2) * masks[1]
    want = {"1.lora_A": s2 * (y @ b2).t() @ (h * masks[1]), "1.lora_B": s2 * y.t() @ ((h * masks[1]) @ a2.t()),
            "0.lora_A": s1 * (dh @ b1).t() @ (x * masks[0]), "0.lora_B": s1 * dh.t() @ ((x * masks[0]) @ a1.t())}
    for name, grad in want.items():
        pool = grads[name]
        active = pool[:2] if name.endswith("lora_A") else pool[:, :2]
        inactive = pool[2:] if name.endswith("lora_A") else pool[:, 2:]
        torch.testing.assert_close(active, grad, rtol=1e-10, atol=1e-12, msg=name)
        assert torch.equal(inactive, torch.zeros_like(inactive)), name


def test_vmap_randomness_decides_whether_samples_share_the_dropout_mask():
    """randomness="different" drew one seed per sample and failed on its .item(); now it gives
    each sample its own mask and "same" one mask for all, as for nn.Dropout."""
    layer = configure_model(nn.Sequential(nn.Linear(8, 6)), 2, capacity=4, dropout=0.5)[0]
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    x = torch.randn(1, 8).expand(5, 8)  # five copies of one sample
    same = torch.func.vmap(layer, randomness="same")(x)
    different = torch.func.vmap(layer, randomness="different")(x)
    torch.testing.assert_close(same, same[:1].expand(5, 6), rtol=0, atol=0)
    assert len({tuple(row.tolist()) for row in different}) > 1

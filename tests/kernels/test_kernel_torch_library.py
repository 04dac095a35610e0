"""torch.library integration: opcheck, torch.compile without graph breaks, double backward."""

import pytest
import torch
from lora_oracle import assert_close64, make_inputs, multiplier_for, oracle

import lorambo
import lorambo.ops.custom_op as custom_op
import lorambo.ops.triton_linear as tl_op
from lorambo.ops.lora_linear_ref import lora_linear_reference


def _args(device, rank=3, p=0.0, seed=0):
    inp = make_inputs(6, 16, 10, 4, w_grad=False, device=device)
    return (inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], rank, 0.7, p, custom_op.seed_tensor(seed))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_forward_op(p, device):
    torch.library.opcheck(torch.ops.lorambo_triton.lora_linear_fwd.default, _args(device, p=p, seed=11))


def test_opcheck_backward_op(device):
    x, w, b, a, bb, rank, s, p, seed = _args(device)
    x, a, bb = (t.detach() for t in (x, a, bb))
    _, t = torch.ops.lorambo_triton.lora_linear_fwd(x, w, b, a, bb, rank, s, p, seed)
    gy = torch.randn(x.shape[0], w.shape[0], device=device)
    torch.library.opcheck(torch.ops.lorambo_triton.lora_linear_bwd.default,
                          (gy, x, w, a, bb, t, rank, s, p, seed, True, False, True, True, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.fixture
def counted_kernels(monkeypatch):
    """Count the kernel-level forward/backward calls and the differentiable fallback."""
    import lorambo_kernels.lora_linear as kernels

    counts = {"fwd": 0, "bwd": 0, "fallback": 0}
    fwd, bwd, fallback = kernels.lora_linear_forward, kernels.lora_linear_backward, custom_op.differentiable_backward

    def wrap(key, fn):
        def inner(*a, **k):
            counts[key] += 1
            return fn(*a, **k)
        return inner

    monkeypatch.setattr(kernels, "lora_linear_forward", wrap("fwd", fwd))
    monkeypatch.setattr(kernels, "lora_linear_backward", wrap("bwd", bwd))
    monkeypatch.setattr(custom_op, "differentiable_backward", wrap("fallback", fallback))
    return counts


def test_torch_compile_fullgraph_runs_the_kernels(counted_kernels, device):
    torch._dynamo.reset()
    inp = make_inputs(2 * 5, 16, 12, 8, device=device)
    x = inp["x"].detach().reshape(2, 5, 16).requires_grad_(True)

    def f(x, a, b):
        return lorambo.ops.triton_linear.lora_linear_triton(x, inp["weight"], inp["bias"], a, b, 5, 0.5).sin().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    loss = compiled(x, inp["lora_A"], inp["lora_B"])
    grads = torch.autograd.grad(loss, (x, inp["lora_A"], inp["lora_B"]))
    assert counted_kernels["fwd"] >= 1 and counted_kernels["bwd"] >= 1 and counted_kernels["fallback"] == 0
    want = torch.autograd.grad(f(x, inp["lora_A"], inp["lora_B"]), (x, inp["lora_A"], inp["lora_B"]))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_compiled_layer_with_dropout_has_no_graph_break_and_fresh_masks():
    # LoRAMBoLinear in train mode draws a new dropout seed per call: under torch.compile that must
    # be a graph value (torch.randint), neither a graph break nor a constant frozen into the graph
    torch._dynamo.reset()
    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(16, 12), rank=4, capacity=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    x = torch.randn(5, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # a graph break raises
    outs = [compiled(x) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])  # new masks
    torch.manual_seed(123)
    again = compiled(x)
    torch.manual_seed(123)
    eager = layer(x)  # the same seed draw from the same generator state: the same mask
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
    layer.eval()  # no dropout: the plain LoRA function
    want = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A[:4].T) @ layer.lora_B[:, :4].T
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)


def test_double_backward_falls_back_to_exact_formulas(counted_kernels, device):
    # create_graph=True (Hessian-vector products) evaluates the backward with torch ops.
    inp = make_inputs(7, 12, 9, 6, w_grad=True, device=device)
    p, seed = 0.3, 21
    mask = multiplier_for(seed, 7, 12, p, device)
    wrt = ("x", "weight", "lora_A", "lora_B")
    vs = [torch.randn_like(inp[n]) for n in wrt]
    y = tl_op.lora_linear_triton(**inp, rank=4, scaling=1.1, dropout_p=p, seed=seed)
    g = torch.autograd.grad(y.square().sum(), [inp[n] for n in wrt], create_graph=True)
    hvp = torch.autograd.grad(sum((gi * v).sum() for gi, v in zip(g, vs)), [inp[n] for n in wrt])
    # create_graph took the differentiable formulas once; the second pass differentiates through
    # dY = 2y, i.e. through the forward op again, whose plain backward runs the kernels.
    assert counted_kernels["fallback"] == 1 and counted_kernels["bwd"] == 1
    in64 = {n: (t.detach().double().requires_grad_(t.requires_grad) if t is not None else None) for n, t in inp.items()}
    y64 = oracle(**in64, rank=4, scaling=1.1, mask=mask)
    g64 = torch.autograd.grad(y64.square().sum(), [in64[n] for n in wrt], create_graph=True)
    hvp64 = torch.autograd.grad(sum((gi * v.double()).sum() for gi, v in zip(g64, vs)), [in64[n] for n in wrt])
    for name, got, want in zip(wrt, hvp, hvp64):
        assert_close64(got, want, rtol=1e-4, what=f"hvp {name}")


def test_layer_through_the_dispatch(device, counted_kernels):
    """LoRAMBoLinear with backend 'triton' runs the kernels, forward and backward."""
    assert lorambo.ops.backend.resolve_backend(device.type, torch.float32) == "triton"
    torch.manual_seed(0)
    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(16, 12), rank=3, capacity=8, alpha=6.0).to(device)
    with torch.no_grad():
        layer.lora_B[:, :3].normal_()
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    y = layer(x)
    ref = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 3, layer.scaling)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert counted_kernels["fwd"] == 1 and counted_kernels["bwd"] == 1
    assert torch.equal(layer.lora_A.grad[3:], torch.zeros_like(layer.lora_A.grad[3:]))

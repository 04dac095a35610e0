"""A short training run end to end on the Triton kernels: LoRAMBoLinear layers, online growth
(``LoRAMBoOptimizer`` with an interval), ``lorambo.optim.AdamW`` and a hand-made component move,
against the same run on the PyTorch reference op. On CUDA (marked gpu) it also checks what only
a GPU can break: the growth draws its new rows of A from a CPU generator (the same numbers on
every process and device) into CUDA pools. On CPU the kernels run under the interpreter at a
tiny size, so CI runs the same procedure."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.nn import keep_components_many
from lorambo.optimizer import LoRAMBoOptimizer

CUDA = torch.cuda.is_available()


def _train(backend: str, device: str, d_in: int, hidden: int, d_out: int, batch: int, steps: int) -> dict:
    lorambo.set_backend(backend)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(device)
    lorambo.configure_model(net, {"0": 1, "2": 2}, capacity={"0": 8, "2": 8})
    layers = lorambo.lora_layers(net)
    spent = sum(m.rank * (m.in_features + m.out_features) for m in layers.values())
    allocator = LoRAMBoOptimizer(net, 3 * spent, interval=3, warmup_steps=2, sketch_rank=2, seed=11)
    opt = lorambo.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.01)
    data = torch.Generator().manual_seed(1)
    teacher = torch.randn(d_in, d_out, generator=data) / d_in ** 0.5  # the task the adapters learn
    losses = []
    for step in range(steps):
        x = torch.randn(batch, d_in, generator=data)
        x, y = x.to(device), (torch.tanh(x @ teacher) + 0.1 * torch.randn(batch, d_out, generator=data)).to(device)
        with allocator.capture(step):
            loss = (net(x) - y).square().mean()
            loss.backward()
        allocator.step(step, optimizer=opt)
        if step == steps - 2:  # a move by hand: reorder and drop one component of the grown layer
            r = layers["2"].rank
            keep_components_many([(layers["2"], list(range(r - 1, 0, -1)))], opt)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        for layer in layers.values():  # inactive slots stay exactly zero on every path
            assert not layer.lora_A[layer.rank:].any() and not layer.lora_B[:, layer.rank:].any()
    lorambo.set_backend(None)
    return {"losses": losses, "ranks": {n: m.rank for n, m in layers.items()},
            "decisions": [(d["event"], d["layer"], d["old_rank"], d["new_rank"]) for d in allocator.decisions],
            "params": {n: p.detach().double().cpu() for n, p in net.named_parameters() if p.requires_grad},
            "slot_steps": {n: opt.state[p]["slot_step"].cpu() for n, p in net.named_parameters()
                           if p in opt.state and "slot_step" in opt.state[p]}}


def _compare(device: str, sizes: dict, rtol: float) -> None:
    kernels, reference = (_train(backend, device, **sizes) for backend in ("triton", "torch"))
    assert any(event == "grow" for event, *_ in kernels["decisions"]), kernels["decisions"]  # growth ran
    assert kernels["decisions"] == reference["decisions"] and kernels["ranks"] == reference["ranks"]
    torch.testing.assert_close(kernels["losses"], reference["losses"], rtol=rtol, atol=0)
    for name, value in reference["params"].items():
        torch.testing.assert_close(kernels["params"][name], value, rtol=rtol, atol=rtol * value.abs().max(),
                                   msg=name)
    assert kernels["slot_steps"].keys() == reference["slot_steps"].keys() and kernels["slot_steps"]
    for name, counts in reference["slot_steps"].items():
        assert torch.equal(kernels["slot_steps"][name], counts), name


@pytest.mark.skipif(CUDA, reason="the CUDA variant below runs instead")
def test_training_run_under_the_interpreter():
    _compare("cpu", dict(d_in=12, hidden=20, d_out=8, batch=8, steps=8), rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_training_run_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    _compare("cuda", dict(d_in=256, hidden=512, d_out=128, batch=64, steps=12), rtol=2e-3)

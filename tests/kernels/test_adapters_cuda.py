"""Adapters of a CUDA model: lorambo's own files and peft's format both ways, merge and unload,
on the Triton kernels (the CPU suite saves and loads CPU models only). Marked gpu; collected by
gpu-check from tests/kernels."""

import pytest
import torch
from torch import nn

import lorambo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32)).cuda()
    lorambo.configure_model(net, {"0": 6, "2": 3}, capacity=16)
    return net


def _trained():
    net = _model()
    opt = lorambo.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        net(torch.randn(8, 64, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net


def test_save_load_export_import_merge_unload_on_cuda(tmp_path):
    from peft import PeftModel

    torch.backends.cuda.matmul.allow_tf32 = False
    net, x = _trained(), torch.randn(5, 64, device="cuda")
    with torch.no_grad():
        want = net(x)
        lorambo.save_adapter(net, tmp_path / "lorambo")
        fresh = _model()
        lorambo.load_adapter(fresh, tmp_path / "lorambo")
        torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-6)

        lorambo.export_peft(net, tmp_path / "peft")
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32)).cuda()
        theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        torch.testing.assert_close(theirs(x), want, rtol=1e-4, atol=1e-5)

        torch.manual_seed(0)
        back = lorambo.import_peft(nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32)).cuda(),
                                   tmp_path / "peft")
        assert all(m.lora_A.is_cuda for m in lorambo.lora_layers(back).values())
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-6)

        for layer in lorambo.lora_layers(net).values():
            layer.merge()
        torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-5)
        plain = lorambo.unload(net)
        assert not lorambo.lora_layers(plain)
        torch.testing.assert_close(plain(x), want, rtol=1e-4, atol=1e-5)
